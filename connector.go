package tenantpg

import (
	"context"
	"database/sql/driver"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"
)

// drainTimeout bounds how long a closed socket waits for the server to close
// its end. A healthy server closes within a round trip of receiving
// Terminate; past this the token is given back anyway so that an unreachable
// server cannot leak the budget.
const drainTimeout = 3 * time.Second

// connector is the driver.Connector for one DSN. Every connector for the
// same server, user and database shares one *database.
type connector struct {
	drv   *Driver
	db    *database
	inner driver.Connector // pgx stdlib, dialing through trackedDial

	closeOnce sync.Once
}

var (
	_ driver.Connector = (*connector)(nil)
	_ io.Closer        = (*connector)(nil)
)

// Driver returns the *Driver the connector belongs to.
func (c *connector) Driver() driver.Driver { return c.drv }

// Close releases the connector's share of its database's state. database/sql
// calls it from DB.Close.
func (c *connector) Close() error {
	c.closeOnce.Do(func() { c.drv.b.unregister(c.db) })
	return nil
}

// Connect takes a token from the budget, waiting when there is none, and
// dials. The whole call is bounded by the acquire timeout because
// database/sql's connection opener calls Connect with a context that never
// ends.
func (c *connector) Connect(ctx context.Context) (driver.Conn, error) {
	pc, tok, created, err := c.connect(ctx)
	if err != nil {
		return nil, err
	}
	cn := &conn{pc: pc, cn: c, db: c.db, b: c.drv.b, tok: tok, created: created}
	if !c.drv.b.connected(cn) {
		_ = cn.Close()
		return nil, errDriverClosed
	}
	return cn, nil
}

// connect takes a token and dials; on success the token is counted as
// dialing until the caller records the connection.
func (c *connector) connect(ctx context.Context) (*stdlib.Conn, *token, time.Time, error) {
	b := c.drv.b
	b.mu.Lock()
	timeout := b.acquireTimeout
	b.mu.Unlock()
	caller := ctx
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	tok, err := b.acquire(ctx, caller, c.db)
	if err != nil {
		return nil, nil, time.Time{}, err
	}
	pc, err := c.dial(ctx, tok)
	return pc, tok, time.Now(), err
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
		b.dialFailed(tok, classifyDialError(err), err)
	}()
	start := time.Now()
	dctx := context.WithValue(ctx, tokenKey{}, &dialTarget{b: b, tok: tok})
	dc, err := c.inner.Connect(dctx)
	var refused error // the last refusal for lack of slots, if any
	attempts := 0
	for err != nil && classifyDialError(err) == dialRejected {
		// The server has no slot although the budget has a token: close an
		// idle connection, back off, and try again within the deadline.
		// This token's own refused socket drains meanwhile.
		attempts++
		refused = err
		b.countRejection()
		if ctx.Err() == nil {
			gone := b.relieveServer(c.db)
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
		return nil, e
	}
	dialed = true
	b.metrics.Load().recordCreate(time.Since(start))
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

func classifyDialError(err error) dialErrorKind {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "53300" {
		return dialRejected
	}
	return dialOther
}

func (c *connector) dialError(ctx context.Context, err error) error {
	b := c.drv.b
	b.mu.Lock()
	ws, name := c.db.workspace, c.db.name
	b.mu.Unlock()
	e := &ConnectError{Workspace: ws, Database: name, Err: err}
	if ctxErr := ctx.Err(); ctxErr != nil {
		e.ctxErr = ctxErr
	} else if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
		e.ctxErr = context.DeadlineExceeded
	}
	return e
}

// tokenKey carries the dialTarget from Connect to trackedDial through the
// dial context: pgx calls DialFunc for every attempt (TLS fallback, several
// hosts) and for cancel requests, and only the first kind belongs to a token.
type tokenKey struct{}

type dialTarget struct {
	b   *budget
	tok *token
}

// trackedDial wraps pgx's dialer so that every socket opened for a token is
// counted, and the token is released only after each one is drained.
func trackedDial(inner pgconn.DialFunc) pgconn.DialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		nc, err := inner(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		t, _ := ctx.Value(tokenKey{}).(*dialTarget)
		if t == nil {
			return nc, nil // a cancel request: no backend is created for it
		}
		s := &trackedConn{Conn: nc, target: t}
		t.b.socketOpened(t.tok, s)
		return s, nil
	}
}

// trackedConn is a socket whose Close waits, in the background, for the
// server to close its end before the token is returned. pgconn's Close sends
// Terminate and closes the socket without waiting, and the backend process
// lingers for a moment after that; a new dial in that moment would make the
// server see one connection more than the budget.
type trackedConn struct {
	net.Conn
	target *dialTarget
	once   sync.Once
	closed atomic.Bool
}

func (s *trackedConn) Close() error {
	s.once.Do(func() {
		s.closed.Store(true)
		s.target.b.drainStarted()
		go s.drain()
	})
	return nil
}

// After Close the drain owns the deadlines: pgconn's context watcher clears
// them when it stops watching, which would leave the drain of a server that
// never answers waiting forever, its token with it.

func (s *trackedConn) SetDeadline(t time.Time) error {
	if s.closed.Load() {
		return nil
	}
	return s.Conn.SetDeadline(t)
}

func (s *trackedConn) SetReadDeadline(t time.Time) error {
	if s.closed.Load() {
		return nil
	}
	return s.Conn.SetReadDeadline(t)
}

func (s *trackedConn) SetWriteDeadline(t time.Time) error {
	if s.closed.Load() {
		return nil
	}
	return s.Conn.SetWriteDeadline(t)
}

func (s *trackedConn) drain() {
	// Half-close first: a server that never got Terminate (the dial was
	// cancelled, pgconn gave up) ends its backend on EOF.
	if hc, ok := s.Conn.(interface{ CloseWrite() error }); ok {
		_ = hc.CloseWrite()
		_ = s.Conn.SetReadDeadline(time.Now().Add(drainTimeout))
		_, _ = io.Copy(io.Discard, s.Conn)
	}
	_ = s.Conn.Close()
	s.target.b.socketDrained(s.target.tok)
}

// conn wraps pgx's *stdlib.Conn. It tells the budget when database/sql checks
// the connection out (ResetSession, or any call) and in (IsValid), so that
// only connections in database/sql's free list are ever evicted, and it turns
// a call on a connection the driver has evicted into driver.ErrBadConn, which
// makes database/sql retry on another connection.
type conn struct {
	cn    *connector
	db    *database
	b     *budget
	state atomic.Int32

	// Replaced, under budget.mu, only when a conn evicted before its first
	// use dials again; read by database/sql's calls, which that replacement
	// is serialised with, and by the budget under its lock.
	pc      *stdlib.Conn
	tok     *token
	created time.Time

	// Guarded by budget.mu.
	idleSince  time.Time
	used       bool      // a driver call has been made on it
	checkedOut time.Time // when database/sql last took it
	inOp       bool      // idle, but database/sql is closing a statement on it
	link       links[conn]
}

func (c *conn) lnk() *links[conn] { return &c.link }

var (
	_ driver.Conn               = (*conn)(nil)
	_ driver.ConnBeginTx        = (*conn)(nil)
	_ driver.ConnPrepareContext = (*conn)(nil)
	_ driver.ExecerContext      = (*conn)(nil)
	_ driver.QueryerContext     = (*conn)(nil)
	_ driver.Pinger             = (*conn)(nil)
	_ driver.SessionResetter    = (*conn)(nil)
	_ driver.Validator          = (*conn)(nil)
	_ driver.NamedValueChecker  = (*conn)(nil)
)

// use marks the conn busy before any call on it. database/sql does not always
// call ResetSession before reusing a connection, so every entry point checks.
// It fails with driver.ErrBadConn when the driver has evicted the conn, and
// database/sql retries on another one.
func (c *conn) use(ctx context.Context) error {
	if c.state.Load() == stateBusy {
		return nil
	}
	ok, redial := c.b.checkout(c, time.Now())
	switch {
	case ok:
		return nil
	case redial:
		pc, tok, created, err := c.cn.connect(ctx)
		if err != nil {
			return err
		}
		if !c.b.redialed(c, pc, tok, created) {
			return driver.ErrBadConn // the driver was closed meanwhile
		}
		return nil
	}
	return driver.ErrBadConn
}

// broken reports whether pgx found the connection closed. pc is nil only in
// the budget's state-machine fuzz test, which runs without a server.
func (c *conn) broken() bool { return c.pc != nil && c.pc.Conn().IsClosed() }

// deadPeer reports whether a connection idle for a while has been closed by
// the server meanwhile. Only the checkout path calls it, after the conn is
// busy, so idleSince and tok are stable.
func (c *conn) deadPeer(now time.Time) bool {
	if c.tok.sock == nil || now.Sub(c.idleSince) < c.b.livenessAfter {
		return false
	}
	return c.tok.sock.peerGone()
}

func (c *conn) ResetSession(ctx context.Context) error {
	if st := c.state.Load(); st != stateBusy {
		now := time.Now() // one clock read serves the use time and the liveness check
		ok, redial := c.b.checkout(c, now)
		if ok && st == stateIdle && c.deadPeer(now) {
			// Found before a statement was sent: database/sql retries on
			// another connection and the caller never sees this one.
			c.b.countBroken(c)
			return driver.ErrBadConn
		}
		switch {
		case redial:
			// database/sql ignores every ResetSession error but ErrBadConn
			// and hands the conn out anyway: leave the redial to the first
			// real call, whose error reaches the caller.
			return nil
		case !ok:
			return driver.ErrBadConn
		}
	}
	return c.pc.ResetSession(ctx)
}

func (c *conn) IsValid() bool {
	if c.state.Load() == stateIdle {
		return true // returned again without a checkout in between
	}
	return c.b.checkin(c)
}

func (c *conn) Close() error {
	if !c.b.closeConn(c) {
		return nil
	}
	return c.pc.Close()
}

func (c *conn) Prepare(query string) (driver.Stmt, error) {
	return c.PrepareContext(context.Background(), query)
}

func (c *conn) PrepareContext(ctx context.Context, query string) (driver.Stmt, error) {
	if err := c.use(ctx); err != nil {
		return nil, err
	}
	s, err := c.pc.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	return &stmt{Stmt: s.(*stdlib.Stmt), conn: c}, nil
}

func (c *conn) Begin() (driver.Tx, error) {
	return c.BeginTx(context.Background(), driver.TxOptions{})
}

func (c *conn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	if err := c.use(ctx); err != nil {
		return nil, err
	}
	return c.pc.BeginTx(ctx, opts)
}

func (c *conn) ExecContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	if err := c.use(ctx); err != nil {
		return nil, err
	}
	return c.pc.ExecContext(ctx, query, args)
}

func (c *conn) QueryContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Rows, error) {
	if err := c.use(ctx); err != nil {
		return nil, err
	}
	return c.pc.QueryContext(ctx, query, args)
}

func (c *conn) Ping(ctx context.Context) error {
	if err := c.use(ctx); err != nil {
		return err
	}
	return c.pc.Ping(ctx)
}

func (c *conn) CheckNamedValue(v *driver.NamedValue) error { return c.pc.CheckNamedValue(v) }

// stmt wraps a prepared statement so that closing it on a connection in
// database/sql's free list cannot race with an eviction.
type stmt struct {
	*stdlib.Stmt
	conn *conn
}

var (
	_ driver.StmtExecContext  = (*stmt)(nil)
	_ driver.StmtQueryContext = (*stmt)(nil)
)

func (s *stmt) Close() error {
	ok, wasIdle := s.conn.b.beginIdleOp(s.conn)
	if !ok {
		return nil // the connection, and the statement with it, is gone
	}
	err := s.Stmt.Close()
	if wasIdle {
		s.conn.b.endIdleOp(s.conn)
	}
	return err
}

func (s *stmt) ExecContext(ctx context.Context, args []driver.NamedValue) (driver.Result, error) {
	if err := s.conn.use(ctx); err != nil {
		return nil, err
	}
	return s.Stmt.ExecContext(ctx, args)
}

func (s *stmt) QueryContext(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	if err := s.conn.use(ctx); err != nil {
		return nil, err
	}
	return s.Stmt.QueryContext(ctx, args)
}

// PgxConn returns the *pgx.Conn under a connection of this driver, for use
// inside (*sql.Conn).Raw: COPY, LISTEN/NOTIFY, pgx types. The connection is
// checked out for as long as the *sql.Conn is held, so the driver never
// evicts it while the *pgx.Conn is in use. Do not keep the *pgx.Conn after
// Raw returns, and do not close it: database/sql owns it.
func PgxConn(driverConn any) (*pgx.Conn, error) {
	c, ok := driverConn.(*conn)
	if !ok {
		return nil, errors.New("tenantpg: PgxConn: not a tenantpg connection (call it inside (*sql.Conn).Raw)")
	}
	if err := c.use(context.Background()); err != nil {
		return nil, err
	}
	return c.pc.Conn(), nil
}
