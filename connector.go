package tenantpg

import (
	"context"
	"database/sql/driver"
	"errors"
	"io"
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/stdlib"
)

// A pool's backends: the state of one connector (a *sql.DB, a Pool, or one
// workspace of a routed DB), the backends it dialed, the callers queued for
// one, and the decision to wait for a busy backend or dial another.

// database is one pool: the backends one connector dialed with its own DSN,
// which serve only that connector's handles. Two *sql.DBs opened with the
// same DSN are two pools, as with pgx's stdlib driver; pools share their
// server's budget, recency order, queue, dial pacing, circuit and fleet
// lease, never a session.
type backendPool struct {
	id   uint64 // distinct per pool of the driver, for Stats
	name string
	// resetSession: its backends' sessions are reset at every check-in
	// (pool_reset_session). Set by register, then constant.
	resetSession bool
	// metricOpts are its metric attribute sets, built by the first
	// collection that sees it; not guarded by budget.mu.
	metricOpts atomic.Pointer[dbMetricOpts]

	// Guarded by budget.mu.
	srv         *server // its server's budget and circuit; nil once forgotten
	workspace   string
	capOverride int // pool_max_conns; 0 = the driver's per-database default
	reserved    int // pool_reserved_conns
	refs        int // its connector, handles and waiters
	// closed: its connector was closed. Its idle backends were closed
	// then, and a backend checked in later is closed, so that no session
	// of a closed pool (temporary tables, SET, advisory locks, LISTEN)
	// reaches later code.
	closed bool

	open      int // tokens held by this database
	dialing   int
	inUse     int
	idle      int
	closing   int
	lastUsed  time.Time
	evictions uint64

	waiters list[waiter, waiterInDBQueue] // callers waiting for a backend, oldest first
	seeking int                           // waiters in its server's queue, to dial
	// idleBackends are most recently checked in first; a checkout takes
	// the front, so backends the load no longer needs age at the back.
	idleBackends list[backend, backendInList]
	// busy holds the checked-out backends, oldest checkout first, so that
	// Stats can name one held for minutes (a leaked *sql.Conn, Rows or Tx)
	// without a scan.
	busy list[backend, backendInList]
	// useTime is the EWMA of how long a caller holds a backend.
	useTime ewma
	// waitDebt is the time its callers spent waiting for a backend,
	// decaying with waitDebtDecay, in nanoseconds, as of debtAt.
	waitDebt float64
	debtAt   time.Time

	lru links[backendPool] // in the budget's recency lists while it has idle backends
	// spare: in the recency's spare lists, while listed and holding two
	// live backends or more (lru.go).
	spare links[backendPool]
	// protected: one of its backends was reused since it last had none.
	// Cleared when it holds no backend or is demoted.
	protected bool
}

type backendState uint8

const (
	backendDialing backendState = iota // not known to the budget yet
	backendBusy                        // checked out by a handle
	backendIdle                        // in its database's idle list; may be evicted
	backendClosing                     // closed by the driver
)

// backend is one physical connection, owned by the driver. A handle holds
// it from checkout to check-in; in between it is idle, and only then can the
// driver close it.
type backend struct {
	pc *stdlib.Conn // set before it is known to the budget, then constant
	// resetFailed: its session reset failed (giveBack). Written by the
	// caller that holds it, before its check-in takes budget.mu.
	resetFailed bool

	// Set by budget.dialed, then constant.
	db      *backendPool
	tok     *token
	created time.Time

	// Guarded by budget.mu.
	state      backendState
	idleSince  time.Time
	checkedOut time.Time
	link       links[backend]
	// stack is where the caller that holds it checked it out (program
	// counters, symbolized only when logged), captured while
	// Config.LeakThreshold is set; nil otherwise. Replaced, never written
	// to, at each checkout, so the slice may be read after the lock is
	// released.
	stack []uintptr
	// watch links it into budget.watched while it is checked out and not
	// yet reported as a suspected leak; leaked marks one reported.
	watch  links[backend]
	leaked bool
}

type backendWatched struct{}

func (backendWatched) links(be *backend) *links[backend] { return &be.watch }

type backendInList struct{}

func (backendInList) links(be *backend) *links[backend] { return &be.link }

// backendIO is what the budget does to a backend's connection: pgx in
// production, a stand-in in the state-machine test.
type backendIO interface {
	close(be *backend)
	// broken reports a backend that must not be reused: pgx found it
	// closed, or it was checked in inside a transaction or mid-operation.
	broken(be *backend) bool
}

type pgxIO struct{}

func (pgxIO) close(be *backend) { _ = be.pc.Close() }

func (pgxIO) broken(be *backend) bool {
	pg := be.pc.Conn().PgConn()
	return pg.IsClosed() || pg.TxStatus() != 'I' || pg.IsBusy()
}

// Weights of the moving averages: a database's use time follows its load
// within a few dozen checkouts; a dial time, measured less often, within
// a handful of dials.
const (
	useTimeAlpha  = 1.0 / 16
	dialTimeAlpha = 1.0 / 8
)

// waitDebtDecay is the time constant of a database's wait debt: callers that
// together wait longer than a dial takes within about this long justify a
// dial. Sustained moderate concurrency (two callers of short queries on one
// backend wait a few dozen microseconds each, tens of thousands of times a
// second) passes it within milliseconds; a hot workspace under churn, whose
// few callers overlap now and then, does not.
const waitDebtDecay = time.Second

// owe adds a caller's wait to d's wait debt; guarded by budget.mu.
func (d *backendPool) owe(waited time.Duration, now time.Time) {
	d.decayDebt(now)
	d.waitDebt += float64(waited)
}

func (d *backendPool) decayDebt(now time.Time) {
	if dt := now.Sub(d.debtAt); dt > 0 {
		if d.waitDebt != 0 {
			d.waitDebt *= math.Exp(-float64(dt) / float64(waitDebtDecay))
		}
		d.debtAt = now
	}
}

// shouldDialLocked decides whether d's pool should grow by a backend: when
// it has none, or when the callers queued on it would together wait longer
// for its busy backends than a dial takes. With n backends (dialing ones
// and those about to be dialed included) serving q queued callers, one
// every u (the database's average use time) / n, the queue costs its
// callers q(q+1)/2 · u/n in all; a dial costs the driver's average dial
// time (dialCostLocked). A caller that has waited as long as a dial costs
// dials too (budget.impatient): its database's backends are held longer
// than their average use, or nothing was measured yet.
//
// That judges a burst. Sustained load is judged by what waiting has cost:
// when the waits of d's callers, decaying over waitDebtDecay, add up to more
// than a dial, d dials (and the debt is paid).
//
// A hot database's second backend serving the rare overlaps of short
// queries costs more than it saves under churn, where dials are slow; a
// database with many callers queued on one backend grows to its cap at once.
func (b *budget) shouldDialLocked(d *backendPool, now time.Time) bool {
	n := d.open - d.closing + d.seeking
	if n == 0 {
		return true
	}
	if n >= b.capLocked(d) || d.useTime == 0 {
		return false // at the cap, or nothing measured yet: the first backend will tell
	}
	cost := float64(b.dialCostLocked(d))
	q := float64(d.waiters.len - d.seeking)
	if q*(q+1)/2*float64(d.useTime)/float64(n) > cost {
		return true
	}
	d.decayDebt(now)
	return d.waitDebt > cost
}

// dialCostLocked is what a new backend for d costs: the average dial time,
// twice that when the budget is full and the dial evicts another database's
// backend, which that database is likely to dial again (for growth only a
// spare one, of a database that keeps another: lru.go).
func (b *budget) dialCostLocked(d *backendPool) time.Duration {
	if !b.roomLocked(d) {
		return 2 * b.dialTime.duration()
	}
	return b.dialTime.duration()
}

// connector is the driver.Connector for one DSN: one pool, whose backends
// are dialed with every setting of that DSN (credentials, TLS, hosts,
// run-time parameters, pgx's exec mode and caches) and serve no other
// connector.
type connector struct {
	drv       *Driver
	db        *backendPool
	workspace string           // the label its DSN gave, for traces
	inner     driver.Connector // pgx stdlib, dialing through trackedDial
	password  string           // its DSN's, kept out of the dial errors it returns

	own       owner // its handles; guarded by budget.mu
	closeOnce sync.Once
}

var (
	_ driver.Connector = (*connector)(nil)
	_ io.Closer        = (*connector)(nil)
)

// Driver returns the *Driver the connector belongs to.
func (c *connector) Driver() driver.Driver { return c.drv }

// Close closes the pool: its idle backends at once, its busy ones as they
// are checked in. database/sql calls it from DB.Close.
func (c *connector) Close() error {
	c.closeOnce.Do(func() { c.drv.b.closeOwner(c.db, &c.own) })
	return nil
}

// Connect returns a handle. It dials nothing: the handle takes a backend
// when database/sql starts using it.
func (c *connector) Connect(context.Context) (driver.Conn, error) {
	return newHandle(c.drv.b, c, nil, &c.own)
}

// checkout gets a backend of the connector's database for a handle: an idle
// one, one another caller checks in, or a new one.
func (c *connector) checkout(ctx context.Context) (*backend, error) {
	b := c.drv.b
	stack := b.captureStack()
	for {
		now := b.clock.Now()
		be, w, err := b.take(c.db, now, stack)
		if err != nil {
			return nil, err
		}
		if w != nil {
			return c.wait(ctx, w)
		}
		if c.alive(ctx, be, now) {
			return be, nil
		}
		b.discard(be)
	}
}

// alive checks an idle backend before a statement is sent on it: one whose
// server ended it meanwhile (a terminated backend, a restart) is replaced
// without failing the caller. A backend reused within livenessAfter was
// checked at its check-in (budget.io.broken); one idle for longer gets a
// non-blocking peek at its socket, and one idle for more than pingAfter a
// ping, as pgx's ResetSession would do, but timed from the check-in, which
// the driver knows, and without another clock read.
func (c *connector) alive(ctx context.Context, be *backend, now time.Time) bool {
	idle := now.Sub(be.idleSince)
	if idle < c.drv.b.livenessAfter {
		return true
	}
	if be.tok.sock != nil && be.tok.sock.peerGone() {
		return false
	}
	if idle < pingAfter || ctx.Err() != nil {
		// A caller whose context has ended gets the backend unchecked: pgx
		// fails its statement before any I/O, and a ping would fail the
		// same way and have a healthy backend discarded.
		return true
	}
	return be.pc.Conn().PgConn().Ping(ctx) == nil
}

// giveBack returns a caller's backend to the driver, first resetting its
// session when its pool asks for it (pool_reset_session): DISCARD ALL ends
// everything the caller left in the session (SET, temporary tables,
// advisory locks, LISTEN, prepared statements), and pgx's DeallocateAll
// empties the statement and description caches that referred to those
// statements. It runs on the caller's goroutine, outside the budget's lock,
// and only on a backend that can be reused; one whose reset fails is closed.
func (b *budget) giveBack(be *backend) {
	if be.db.resetSession && !b.io.broken(be) {
		ctx, cancel := context.WithTimeout(context.Background(), b.timeout())
		pc := be.pc.Conn()
		err := pc.PgConn().Exec(ctx, "DISCARD ALL").Close()
		if err == nil {
			err = pc.DeallocateAll(ctx)
		}
		cancel()
		be.resetFailed = err != nil
	}
	b.checkin(be)
}

// pingAfter is how long a backend must have been idle before its checkout
// pings the server: pgx's stdlib default.
const pingAfter = time.Second

// wait waits for w to be served and dials when it gets a token. The whole
// of it is bounded by the acquire timeout, because database/sql may hand a
// handle out under a context that never ends. A dial that finds the server
// down does not fail its caller: it waits again, for the server's probe, as
// the callers queued behind it do.
func (c *connector) wait(ctx context.Context, w *waiter) (*backend, error) {
	b := c.drv.b
	timeout := b.timeout()
	caller := ctx
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	a := acquireTrace{workspace: c.workspace, database: c.db.name, queued: w.since}
	finish := func(be *backend, err error, outcome string) (*backend, error) {
		if b.tracing.Load().tracer() == nil {
			return be, err
		}
		a.end, a.outcome, a.err = b.clock.Now(), outcome, err
		if err != nil {
			a.outcome = "failed"
		}
		b.tracing.Load().record(caller, &a)
		return be, err
	}
	for {
		be, tok, err := b.await(ctx, caller, w)
		if a.sought.IsZero() {
			a.sought = w.sought
		}
		if w.evicted != "" {
			a.evicted = w.evicted
		}
		if a.slotted.IsZero() {
			a.slotted = w.slotted
		}
		if err != nil || be != nil {
			return finish(be, err, "handoff")
		}
		a.dialStart = b.clock.Now()
		pc, err := c.dial(ctx, tok)
		a.dialEnd = b.clock.Now()
		if err == nil {
			if be = b.dialed(tok, &backend{pc: pc, stack: w.stack}, a.dialEnd.Sub(a.dialStart)); be == nil {
				return finish(nil, errDriverClosed, "")
			}
			return finish(be, nil, "dialed")
		}
		if ctx.Err() != nil {
			// Its deadline cut the dial short, a probe's included: while
			// the server is down, that is what the caller is told.
			if de := b.serverDownError(c.db, b.clock.Now().Sub(w.since), err, caller.Err()); de != nil {
				return finish(nil, de, "")
			}
			return finish(nil, err, "")
		}
		var ce *ConnectError
		if !errors.As(err, &ce) || !ce.down {
			return finish(nil, err, "")
		}
		if a.downAt.IsZero() {
			a.downAt = a.dialEnd
		}
		if be, w, err = c.requeue(ctx, w.stack); be != nil || err != nil {
			return finish(be, err, "idle")
		}
	}
}

// requeue is the start of a checkout again, for a caller whose dial found
// the server down: an idle backend if another caller checked one in
// meanwhile, or else a place in the queue.
func (c *connector) requeue(ctx context.Context, stack []uintptr) (*backend, *waiter, error) {
	b := c.drv.b
	for {
		now := b.clock.Now()
		be, w, err := b.take(c.db, now, stack)
		if err != nil || w != nil {
			return nil, w, err
		}
		if c.alive(ctx, be, now) {
			return be, nil, nil
		}
		b.discard(be)
	}
}

func (c *connector) dial(ctx context.Context, tok *token) (_ *stdlib.Conn, err error) {
	b := c.drv.b
	dialed := false
	defer func() {
		if dialed {
			return
		}
		// A panic in pgx or in a hook must not keep the token.
		if p := recover(); p != nil {
			b.dialFailed(tok, dialOther, nil)
			panic(p)
		}
		kind := classifyDialError(err)
		var ce *ConnectError
		if errors.As(err, &ce) && ce.down {
			kind = dialDown
		}
		b.dialFailed(tok, kind, err)
	}()
	start := b.clock.Now()
	// A server that accepted the connection and does not answer is marked
	// down while this dial still waits for it, so that other callers do not
	// pile their dials (and tokens) onto it.
	watch, hungAfter := b.watchDial(tok)
	defer watch.Stop()
	dctx := context.WithValue(ctx, tokenKey{}, &dialTarget{b: b, tok: tok})
	dc, err := c.inner.Connect(dctx)
	var refused error // the last refusal for lack of slots, if any
	attempts := 0
	for err != nil && classifyDialError(err) == dialRejected {
		// The server has no slot although the budget has a token: close an
		// idle backend, back off, and try again within the deadline. This
		// token's own refused socket drains meanwhile.
		attempts++
		refused = err
		b.countRejection()
		if ctx.Err() == nil {
			gone := b.relieveServer(tok.db)
			pause := time.NewTimer(rejectionBackoff(attempts))
			select {
			case <-ctx.Done():
			case <-gone: // a nil channel never fires: the timer decides
			case <-pause.C:
			}
			pause.Stop()
		}
		if ctx.Err() != nil {
			break
		}
		dc, err = c.inner.Connect(dctx)
	}
	if err != nil {
		if refused != nil && ctx.Err() != nil {
			err = refused // the deadline cut a retry short: the refusal is what happened
		}
		e := c.dialError(ctx, err).(*ConnectError)
		e.Attempts = attempts
		switch classifyDialError(err) {
		case dialDown:
			e.down = true
		case dialOther:
			// A dial its deadline cut short after the server had long
			// enough to answer: the server is not answering.
			e.down = e.ctxErr != nil && refused == nil && b.clock.Now().Sub(start) >= hungAfter
		}
		return nil, e
	}
	dialed = true
	b.metrics.Load().recordCreate(b.clock.Now().Sub(start))
	return dc.(*stdlib.Conn), nil
}

// rejectionBackoff is the pause before the next dial after the server
// refused attempt n for lack of slots: doubling from 5ms to at most 200ms,
// with jitter so that dialers refused together do not retry together.
func rejectionBackoff(n int) time.Duration {
	d := 5 * time.Millisecond << min(n-1, 6)
	if d > 200*time.Millisecond {
		d = 200 * time.Millisecond
	}
	return d/2 + time.Duration(rand.Int64N(int64(d/2)+1))
}

func (c *connector) dialError(ctx context.Context, err error) error {
	ws, name := c.drv.b.names(c.db)
	e := &ConnectError{Workspace: ws, Database: name, Err: scrubDialError(err, c.password)}
	if ctxErr := ctx.Err(); ctxErr != nil {
		e.ctxErr = ctxErr
	} else if dl, ok := ctx.Deadline(); ok && !c.drv.b.clock.Now().Before(dl) {
		e.ctxErr = context.DeadlineExceeded
	}
	return e
}
