package tenantpg

import (
	"context"
	"errors"
	"runtime"
	"sync/atomic"

	"github.com/jackc/pgx/v5"
)

// Pool is a workspace's database for code that uses pgx directly instead of
// database/sql. It hands out backends from the driver's budget, with the
// same queue, hand-off, eviction, metrics and errors as database/sql's
// handles, so a service that mixes both APIs still has one budget. A Pool is
// a pool of its own, as a *sql.DB is: its backends serve only its Acquire
// calls.
type Pool struct {
	b *budget
	// One database (fixed) or, under a {workspace} DSN, the workspace each
	// Acquire's context names (router).
	fixed  *connector
	router *router
	closed atomic.Bool
}

// PoolConn is a backend checked out of a Pool. It is not safe for
// concurrent use, as a *pgx.Conn is not. One that becomes garbage without
// Release has its backend closed and its token given back, as a handle of
// database/sql dropped without Close does (reclaim.go), at the garbage
// collector's next cycle after it was dropped: keep the PoolConn, not only
// its *pgx.Conn, until Release.
type PoolConn struct {
	be *backend
	// hold mirrors be for the cleanup that reclaims it if the PoolConn is
	// dropped without Release; the cleanup must not reach the PoolConn.
	hold    *hold
	cleanup runtime.Cleanup
}

var errPoolClosed = errors.New("tenantpg: pool closed")

// OpenPool opens dsn through the registered driver. See (*Driver).OpenPool.
func OpenPool(dsn string) (*Pool, error) { return defaultDriver.OpenPool(dsn) }

// OpenPool opens dsn's database for pgx-native use. It dials nothing;
// Acquire does, when the database has no idle backend and the driver
// decides it needs another. The DSN is read as by OpenDB; pool_max_conns
// and pool_reserved_conns apply to this Pool alone.
func (d *Driver) OpenPool(dsn string) (*Pool, error) {
	c, err := d.OpenConnector(dsn)
	if err != nil {
		return nil, err
	}
	p := &Pool{b: d.b}
	switch c := c.(type) {
	case *connector:
		p.fixed = c
	case *router:
		p.router = c
	}
	return p, nil
}

// Acquire checks out a backend: an idle one of the database, one another
// caller checks in, or a new one, waiting within ctx and the driver's
// AcquireTimeout. Its errors are those of database/sql's path:
// *BudgetError (ErrBudgetExhausted), *ConnectError, or the driver closed.
// Call Release when done; until then the backend is never evicted. A
// Pool opened with a {workspace} DSN acquires from the workspace ctx names
// (WithWorkspace), and fails with ErrNoWorkspace when it names none.
func (p *Pool) Acquire(ctx context.Context) (*PoolConn, error) {
	if p.closed.Load() {
		return nil, errPoolClosed
	}
	var be *backend
	var err error
	if p.router == nil {
		if be, err = p.fixed.checkout(ctx); err == errDBClosed {
			err = errPoolClosed // closed between the check above and the checkout
		}
	} else {
		ws, named := WorkspaceFromContext(ctx)
		if !named {
			return nil, ErrNoWorkspace
		}
		be, err = p.router.checkout(ctx, ws)
	}
	if err != nil {
		return nil, err
	}
	h := &hold{b: p.b}
	h.be.Store(be)
	c := &PoolConn{be: be, hold: h}
	c.cleanup = runtime.AddCleanup(c, reclaim, h)
	return c, nil
}

// Close closes the pool's idle backends. Backends checked out keep working
// until released, and are closed then.
func (p *Pool) Close() {
	if !p.closed.CompareAndSwap(false, true) {
		return
	}
	if p.fixed != nil {
		_ = p.fixed.Close()
	} else {
		_ = p.router.Close()
	}
}

// Conn returns the *pgx.Conn of the backend. Do not use it after Release,
// and do not close it: the driver owns it. Session state (SET, temporary
// tables, prepared statements by name) stays with the backend for its next
// user, as with any pool; a backend released inside a transaction is
// closed, not reused.
func (c *PoolConn) Conn() *pgx.Conn { return c.be.pc.Conn() }

// Release checks the backend back in. A second Release does nothing.
func (c *PoolConn) Release() {
	if be := c.be; be != nil {
		c.be = nil
		c.cleanup.Stop()
		c.hold.be.Store(nil)
		c.hold.b.giveBack(be)
	}
}
