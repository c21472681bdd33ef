package tenantpg

import (
	"context"
	"database/sql/driver"
	"errors"
	"io"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/stdlib"
)

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
