package tenantpg

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// The budget is the process-wide (per Driver) count of physical connections
// (backends). A token stands for one backend: it is taken before a dial
// starts and given back only after the server has closed that backend's
// socket, so the server never sees more connections than the budget.
//
// Each database may set aside reserved tokens that only it can use; the rest
// form the shared pool. A database's tokens count against its reservation
// first, so sharedInUse == Σ max(0, db.open - db.reserved). Tokens of
// backends being closed still count, as they still count on the server;
// sharedLive leaves them out, to tell whether the shared pool is over a
// lowered budget once those are gone.
//
// The driver owns the backends; database/sql's connections are handles
// (conn.go) that hold a backend only between checkout and check-in. A
// caller that finds no idle backend of its database queues on the database
// (connector.go decides whether it should also dial), and a caller that
// dials needs a token: a free one, one freed by evicting the least recently
// used idle backend (lru.go), or one it waits for in the budget's queue.
//
// Locking: one mutex, budget.mu, guards all of it, every database's
// counters and lists and every backend's state included. Only this file
// takes it; helpers called under it end in Locked. It is never held during
// network I/O: backends chosen for closing under the lock are queued in
// toClose and closed by unlock.
type budget struct {
	// Set once by newBudget, read without the lock.
	clock         clock
	io            backendIO
	handoffAfter  time.Duration
	livenessAfter time.Duration
	hungDialAfter time.Duration // see hungDialAfterLocked
	// leakThreshold is Config.LeakThreshold in nanoseconds, 0 when off;
	// read without the lock by a checkout, to capture its stack.
	leakThreshold atomic.Int64

	mu sync.Mutex

	// Settings; guarded by mu. limit is the budget of a server without a
	// figure of its own in serverLimits (keyed by host:port).
	limit          int
	serverLimits   map[string]int
	aliases        map[string]string // Config.ServerAliases
	fleet          fleetSettings     // max 0: no fleet budget
	perDB          int
	lifetime       time.Duration
	idleTimeout    time.Duration
	acquireTimeout time.Duration

	// Totals over every server, for the driver-wide peak; guarded by mu.
	open     int
	peakOpen int

	dbs     map[*backendPool]struct{} // every pool; guarded by mu
	poolIDs uint64                    // the last pool id given; guarded by mu
	servers map[serverKey]*server     // the servers of dbs, each with its budget and circuit; guarded by mu
	waiting int                       // callers waiting for a backend or a token; guarded by mu
	closed  bool                      // guarded by mu
	shut    atomic.Bool               // closed, for a check-in that holds no backend
	toClose []closeJob                // chosen for closing under mu, closed by unlock; guarded by mu
	reaper  wakeup                    // closes idle backends past their idle time or lifetime; guarded by mu

	// dialTime is the driver's EWMA of a dial's duration, what a caller
	// pays for a new backend; guarded by mu.
	dialTime ewma

	// Leak detection (Config.LeakThreshold); guarded by mu. watched holds
	// the backends checked out while the threshold was set and not yet
	// reported, oldest checkout first, so a scan stops at the first young
	// one; leakCheck runs the scan when the oldest passes the threshold.
	watched   list[backend, backendWatched]
	leakCheck wakeup

	// strays counts the handles still open whose connector (their *sql.DB
	// or Pool) has been closed: busy ones finishing, or ones the
	// application leaked. While there are some, a caller that waits
	// triggers a garbage collection, at most once per collectEvery
	// (lastCollect), so that the backends of handles that became garbage
	// are reclaimed (reclaim.go) without waiting for the next natural
	// collection; collector repeats it while callers still wait. Guarded
	// by mu.
	strays      int
	lastCollect time.Time
	collector   wakeup

	// Cumulative counters; guarded by mu.
	waitCount    uint64
	waitDuration time.Duration
	timeouts     uint64
	evictions    [numReasons]uint64
	dials        uint64
	handoffs     uint64 // backends passed from one caller straight to the next
	exhausted    uint64 // BudgetErrors returned
	leaks        uint64 // backends held longer than the leak threshold, counted once each
	collections  uint64 // garbage collections triggered for stray handles
	dialErrors   [numDialErrorKinds]uint64

	// draining counts sockets being drained after close and jobs the close
	// jobs whose Close has not returned; drained is signalled when both
	// drop to zero. Guarded by mu.
	draining int
	jobs     int
	drained  *sync.Cond

	metrics atomic.Pointer[metrics]
	tracing atomic.Pointer[tracing]
	log     atomic.Pointer[slog.Logger] // nil: no logging
}

// closeJob is a backend chosen for closing under mu and closed by unlock.
type closeJob struct {
	be        *backend
	reason    evictReason
	workspace string
}

// errDriverClosed is returned to callers waiting when the driver closes.
var errDriverClosed = errors.New("tenantpg: driver closed")

func newBudget(cfg Config, clk clock, io backendIO) *budget {
	b := &budget{clock: clk, io: io, dbs: make(map[*backendPool]struct{}), servers: make(map[serverKey]*server),
		handoffAfter: defaultHandoffAfter, livenessAfter: defaultLivenessAfter, hungDialAfter: defaultHungDialAfter}
	b.drained = sync.NewCond(&b.mu)
	b.reaper.fn = b.reap
	b.tracing.Store(newTracing(cfg.TracerProvider, cfg.TraceQueryText))
	b.leakCheck.fn = b.checkLeaks
	b.collector.fn = b.collectAgain
	b.applyLocked(cfg)
	return b
}

// unlock releases mu and then closes the backends chosen for closing while
// it was held, so that no network I/O happens under the lock.
func (b *budget) unlock() {
	if len(b.toClose) == 0 {
		b.mu.Unlock()
		return
	}
	jobs := b.toClose
	b.toClose = nil
	b.mu.Unlock()
	if l := b.log.Load(); l != nil && l.Enabled(bg, slog.LevelDebug) {
		workspaces := make([]string, len(jobs))
		for i, j := range jobs {
			workspaces[i] = j.workspace
		}
		l.LogAttrs(bg, slog.LevelDebug, "tenantpg: closing backends",
			slog.String("reason", reasonNames[jobs[0].reason]), slog.Int("count", len(jobs)), slog.Any("workspaces", workspaces))
	}
	for _, j := range jobs {
		b.io.close(j.be)
		// The token returns once the socket is drained, or now if pgx had
		// closed it already (a broken backend).
		b.mu.Lock()
		b.jobs--
		if b.jobs == 0 && b.draining == 0 {
			b.drained.Broadcast()
		}
		b.endLocked(j.be.tok)
		b.unlock()
	}
}

// timeout returns the acquire timeout.
func (b *budget) timeout() time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.acquireTimeout
}

// settingsLimit returns the budget.
func (b *budget) settingsLimit() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.limit
}

// names returns d's workspace label and database name.
func (b *budget) names(d *backendPool) (workspace, name string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return d.workspace, d.name
}

// register makes the pool of a parsed DSN, on its server's budget.
func (b *budget) register(p *dsnParams) (*backendPool, error) {
	b.mu.Lock()
	defer b.unlock()
	if b.closed {
		return nil, errDriverClosed
	}
	srvKey := b.serverKeyLocked(p.server)
	limit := b.limit
	if s := b.servers[srvKey]; s != nil {
		limit = s.max
	} else if len(b.serverLimits) > 0 {
		limit = b.serverLimitLocked(net.JoinHostPort(srvKey.host, strconv.Itoa(int(srvKey.port))))
	}
	if p.maxConns > limit {
		return nil, &DSNError{Workspace: p.workspace,
			Reason: fmt.Sprintf("pool_max_conns %d exceeds the budget of %d connections", p.maxConns, limit)}
	}
	b.poolIDs++
	d := &backendPool{id: b.poolIDs, name: p.cfg.Database}
	d.srv = b.serverLocked(srvKey)
	b.dbs[d] = struct{}{}
	s := d.srv
	if others := s.reserved; others+p.reserved > s.max {
		b.forgetLocked(d)
		return nil, &DSNError{Workspace: p.workspace,
			Reason: fmt.Sprintf("pool_reserved_conns %d does not fit: the budget is %d and other pools reserve %d", p.reserved, s.max, others)}
	}
	if b.fleet.max > 0 {
		if s.fleet == nil {
			s.fleetRole = p.cfg.User
			s.fleet = startFleet(p.cfg, b.fleet, fleetSide{b, s}, b.clock, b.log.Load())
			s.limit = b.limitNowLocked(s)
		} else if s.fleetRole != p.cfg.User {
			b.forgetLocked(d)
			return nil, &DSNError{Workspace: p.workspace,
				Reason: fmt.Sprintf("the fleet budget on %s is role %q's; this DSN connects as another role (one role per server with a fleet budget)", s.label, s.fleetRole)}
		} else {
			s.fleet.offer(p.cfg) // its password may work where the first DSN's does not
		}
	}
	s.reserved += p.reserved
	d.reserved = p.reserved
	d.capOverride = p.maxConns
	d.workspace = p.workspace
	d.resetSession = p.resetSession
	d.refs++ // the connector's
	if p.reserved > 0 {
		// A new reservation is backed at once by closing idle shared
		// backends; busy ones are closed as they are checked in.
		b.shrinkLocked(s)
		b.serveQueueLocked(s)
	}
	return d, nil
}

// retain counts a new handle: of database d, whose state it keeps alive
// (nil for a router's handle, which keeps none), made by o (nil for one
// that Driver.Open returns, which outlives its connector by design). It
// fails once the driver is closed. release undoes it.
func (b *budget) retain(d *backendPool, o *owner) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return errDriverClosed
	}
	if d != nil {
		d.refs++
	}
	if o != nil {
		o.handles++
		if o.closed {
			b.strays++
		}
	}
	return nil
}

// release undoes retain, when a handle is closed or found to be garbage
// (reclaim.go).
func (b *budget) release(d *backendPool, o *owner) {
	b.mu.Lock()
	if o != nil {
		o.handles--
		if o.closed {
			b.strays--
		}
	}
	if d != nil {
		b.unregisterLocked(d)
	}
	b.unlock()
}

// closeOwner records that o's *sql.DB or Pool was closed: its handles still
// open are strays from now on. d, if not nil, is o's pool: its idle
// backends are closed now, its busy ones as they are checked in, whatever
// handles are still open.
func (b *budget) closeOwner(d *backendPool, o *owner) {
	b.mu.Lock()
	if !o.closed {
		o.closed = true
		b.strays += o.handles
	}
	if d != nil {
		d.closed = true
		b.closeIdleLocked(d)
		b.unregisterLocked(d)
	}
	b.unlock()
}

func (b *budget) unregister(d *backendPool) {
	b.mu.Lock()
	b.unregisterLocked(d)
	b.unlock()
}

// releaseIfIdle drops the last reference to d, its router's, when d holds
// no backend and has no caller waiting: a router forgets a workspace that
// has gone quiet, so that serving many workspaces over time does not grow
// memory. A checkout that looked d up before then gets errDBClosed from
// take and looks it up again.
func (b *budget) releaseIfIdle(d *backendPool) bool {
	b.mu.Lock()
	defer b.unlock() // forgetting d serves its server's queue, which may close a backend
	if d.refs != 1 || d.open != 0 {
		return false
	}
	d.refs = 0
	b.forgetLocked(d)
	return true
}

// take is the start of a checkout for d. It returns the most recently used
// idle backend of d when there is one (the fast path: no allocation, no
// wait), or else a waiter queued on d, which may already hold a token; the
// caller then calls await. now is the checkout time; stack is the
// caller's (captureStack), nil unless leak detection is on.
func (b *budget) take(d *backendPool, now time.Time, stack []uintptr) (*backend, *waiter, error) {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil, nil, errDriverClosed
	}
	if be := d.idleBackends.front; be != nil {
		b.unlinkIdleLocked(be)
		b.checkoutLocked(be, now, stack)
		d.srv.recency.reusedLocked(d)
		b.mu.Unlock()
		return be, nil, nil
	}
	if d.refs == 0 {
		// Forgotten: its router dropped it, or its Pool was closed,
		// after the caller looked it up.
		b.mu.Unlock()
		return nil, nil, errDBClosed
	}
	w := &waiter{db: d, since: now, ready: make(chan struct{}), stack: stack}
	d.refs++ // a waiter keeps its database's state alive
	d.waiters.pushBack(w)
	b.waiting++
	d.srv.waiting++
	b.growLocked(d)
	if !w.done {
		b.waitCount++ // not served at once: it waits
		if b.strays > 0 {
			b.collectLocked(now)
		}
	}
	if !w.seekingLocked() && !w.done {
		w.patience = b.clock.AfterFunc(b.dialCostLocked(d), func() { b.impatient(w) })
	}
	b.unlock()
	return nil, w, nil
}

// await waits until w is served: with a backend another caller checked in,
// or with a token to dial one. ctx bounds the wait; caller is the context
// the application passed, to tell its cancellation from the acquire
// timeout.
func (b *budget) await(ctx, caller context.Context, w *waiter) (*backend, *token, error) {
	d := w.db
	defer b.unregister(d)
	select {
	case <-w.ready:
		if w.err != nil {
			return nil, nil, w.err
		}
		b.metrics.Load().recordWait(b.clock.Now().Sub(w.since))
		return w.be, w.tok, nil
	case <-ctx.Done():
	}

	b.mu.Lock()
	now := b.clock.Now()
	if w.done {
		if w.err != nil {
			b.mu.Unlock()
			return nil, nil, w.err
		}
		// The grant raced with the end of the wait: pass on what it got.
		if w.be != nil {
			b.checkinLocked(w.be, now, false)
		} else {
			d.dialing--
			d.srv.dialing--
			b.giveLocked(d)
			w.tok.dialDone = true
			if w.tok.probe {
				b.probeEndedLocked(d.srv, now, false) // never dialed: no news of the server
			}
			b.serveQueueLocked(d.srv)
			b.growLocked(d)
		}
	} else {
		if !w.seekingLocked() {
			d.owe(now.Sub(w.since), now) // it waited for a backend of d
		}
		b.dequeueLocked(w)
		w.done = true // out of the queues: a patience timer that fired meanwhile must not queue it again
		b.waitDuration += now.Sub(w.since)
		// It may have held a dial slot, and been the one to dial for those
		// queued behind it.
		b.serveQueueLocked(d.srv)
		b.growLocked(d)
	}
	waited := now.Sub(w.since)
	deadline := errors.Is(ctx.Err(), context.DeadlineExceeded)
	if deadline {
		b.timeouts++
	}
	if s := d.srv; s != nil && s.down {
		e := b.serverDownErrorLocked(d, now, waited, s.lastErr, caller.Err())
		b.unlock()
		m := b.metrics.Load()
		m.recordWait(waited)
		if deadline {
			m.recordTimeout()
		}
		return nil, nil, e
	}
	b.exhausted++
	e := &BudgetError{
		Workspace: d.workspace, Database: d.name,
		Server: d.srv.label, Open: d.srv.open, Limit: d.srv.limit,
		DatabaseOpen: d.open, DatabaseCap: b.capLocked(d),
		Waiting: d.srv.waiting, Waited: waited,
	}
	if caller.Err() != nil {
		e.Err = caller.Err()
	}
	b.unlock()
	m := b.metrics.Load()
	m.recordWait(waited)
	if deadline {
		m.recordTimeout()
	}
	if l := b.log.Load(); l != nil {
		l.LogAttrs(bg, slog.LevelWarn, "tenantpg: connection budget exhausted",
			slog.String("workspace", e.Workspace), slog.Duration("waited", waited), slog.Int("open", e.Open),
			slog.Int("limit", e.Limit), slog.Int("databaseOpen", e.DatabaseOpen), slog.Int("waiting", e.Waiting),
			slog.Bool("callerContextEnded", e.Err != nil))
	}
	return nil, nil, e
}

// impatient lets w dial when it has waited as long as a dial takes, unless
// its database is at its cap: its backends are held longer than the use
// time measured so far (a pinned connection, a long transaction), or
// nothing was measured yet.
func (b *budget) impatient(w *waiter) {
	b.mu.Lock()
	d := w.db
	if !w.done && !w.seekingLocked() && d.open-d.closing+d.seeking < b.capLocked(d) && !d.serverDown() {
		b.seekLocked(w)
	}
	b.unlock()
}

// checkin takes back a backend its handle is done with. used is false for
// a backend a caller got and never used (its wait ended meanwhile).
func (b *budget) checkin(be *backend) {
	now := b.clock.Now()
	b.mu.Lock()
	used := now.Sub(be.checkedOut)
	leaked := be.leaked
	ws := be.db.workspace
	b.checkinLocked(be, now, true)
	b.unlock()
	b.metrics.Load().recordUse(used)
	if leaked {
		if l := b.log.Load(); l != nil {
			l.LogAttrs(bg, slog.LevelInfo, "tenantpg: a connection reported as a suspected leak was returned",
				slog.String("workspace", ws), slog.Duration("held", used))
		}
	}
}

// discard closes a backend a checkout found dead before using it.
func (b *budget) discard(be *backend) {
	b.mu.Lock()
	d := be.db
	b.closeBusyLocked(be, reasonBroken, nil)
	b.growLocked(d)
	b.unlock()
}

// dialed records a successful dial: the new backend is checked out by the
// caller that dialed it. It returns nil when the driver was closed
// meanwhile, after closing the backend.
func (b *budget) dialed(tok *token, be *backend, took time.Duration) *backend {
	b.mu.Lock()
	d := tok.db
	d.dialing--
	d.srv.dialing--
	b.dialTime.add(took, dialTimeAlpha)
	be.db, be.tok = d, tok
	be.created = b.clock.Now()
	d.srv.pace.dialedLocked(tok, took, d.srv.limit, be.created)
	tok.dialDone = true
	b.checkoutLocked(be, be.created, be.stack)
	if b.closed {
		b.closeBusyLocked(be, reasonDriverClosed, nil)
		b.unlock()
		return nil
	}
	b.serveQueueLocked(d.srv) // a dial slot freed
	var downFor time.Duration
	var srv string
	if s := d.srv; s != nil {
		s.dialTime.add(took, dialTimeAlpha)
		s.answered = be.created
		if s.down {
			downFor, srv = b.markUpLocked(s, be.created), s.label
		}
	}
	b.unlock()
	if downFor > 0 {
		b.logServerUp(srv, downFor)
	}
	return be
}

// dialFailed records a failed dial; the token returns once any socket the
// dial opened has been drained.
func (b *budget) dialFailed(t *token, kind dialErrorKind, cause error) {
	b.mu.Lock()
	d := t.db
	// Its server, read now: a token ended here may be the last thing that
	// kept d's state (a Pool closed during the dial), which forgets it.
	s := d.srv
	d.dialing--
	s.dialing--
	t.dialDone = true
	if kind != dialRejected { // rejections are counted as they happen, retries included
		b.dialErrors[kind]++
	}
	b.markClosingLocked(t)
	now := b.clock.Now()
	var wentDown bool
	var downFor time.Duration
	srv := s.label
	switch {
	case kind == dialDown && isContextError(cause) && s.answered.After(t.dialStart):
		// Cut short by its deadline while the server answered other
		// dials: slow, not down.
		if t.probe {
			b.probeEndedLocked(s, now, false)
		}
	case kind == dialDown:
		wentDown = !s.down
		b.markDownLocked(s, now, downCause(cause))
		if t.probe {
			b.probeEndedLocked(s, now, true)
		}
	case isContextError(cause):
		// The caller gave up before the server said anything.
		if t.probe {
			b.probeEndedLocked(s, now, false)
		}
	default:
		// The server answered, if only to refuse this dial.
		s.answered = now
		if t.probe {
			s.probing = false
		}
		downFor = b.markUpLocked(s, now)
	}
	// The token returns once every socket dialed for it has drained: now,
	// if none was opened (a refused dial), and then only after the circuit
	// has seen what this dial found, or the next caller in line would dial
	// a server found down.
	b.endLocked(t)
	// A dial slot freed.
	b.serveQueueLocked(s)
	// Callers queued behind this dial may have no backend coming now.
	b.growLocked(d)
	ws := d.workspace
	b.unlock()
	if wentDown {
		b.logServerDown(srv, ws, downCause(cause))
	}
	if downFor > 0 {
		b.logServerUp(srv, downFor)
	}
	if l := b.log.Load(); l != nil {
		msg := "tenantpg: dial failed"
		if kind == dialRejected {
			msg = "tenantpg: server rejected a connection: no connection slot left (SQLSTATE 53300)"
		}
		attrs := []slog.Attr{slog.String("workspace", ws)}
		if cause != nil {
			attrs = append(attrs, slog.String("error", cause.Error()))
		}
		l.LogAttrs(bg, slog.LevelWarn, msg, attrs...)
	}
}

// socketOpened and socketDrained count the sockets dialed under t.
func (b *budget) socketOpened(t *token, s *trackedConn) {
	b.mu.Lock()
	t.sockets++
	t.sock = s
	b.mu.Unlock()
}

// drainStarted counts a socket whose drain began, so that close can wait
// for it.
func (b *budget) drainStarted() {
	b.mu.Lock()
	b.draining++
	b.mu.Unlock()
}

func (b *budget) socketDrained(t *token) {
	b.mu.Lock()
	b.draining--
	if b.draining == 0 && b.jobs == 0 {
		b.drained.Broadcast()
	}
	t.sockets--
	if t.ended && t.sockets == 0 {
		b.releaseLocked(t)
	}
	b.unlock()
}

// countRejection records a dial the server refused for lack of slots.
func (b *budget) countRejection() {
	b.mu.Lock()
	b.dialErrors[dialRejected]++
	b.mu.Unlock()
}

// relieveServer closes the least recently used idle backend on d's server,
// because the server refused a dial of d for lack of connection slots: its
// limit is below the budget (other clients, a role or database CONNECTION
// LIMIT). It returns a channel closed once that backend is gone, or nil
// when nothing idle can be closed.
func (b *budget) relieveServer(d *backendPool) <-chan struct{} {
	b.mu.Lock()
	v := d.srv.recency.victimLocked()
	if v == nil {
		b.mu.Unlock()
		return nil
	}
	t := v.tok
	if t.gone == nil {
		t.gone = make(chan struct{})
	}
	b.evictLocked(v, reasonServerFull, nil)
	b.unlock()
	return t.gone
}

// reap closes idle backends past their idle timeout or lifetime. It runs on
// a timer armed for the earliest expiry, so an idle driver costs no
// goroutine.
func (b *budget) reap() {
	b.mu.Lock()
	now := b.clock.Now()
	b.reaper.fired()
	var next time.Time
	for _, s := range b.servers {
		s.recency.eachLocked(func(x *backendPool) {
			for be := x.idleBackends.back; be != nil; {
				prev := x.idleBackends.prev(be)
				if at := b.expiryLocked(be); !at.After(now) {
					reason := reasonIdleTimeout
					if b.lifetime > 0 && now.Sub(be.created) >= b.lifetime {
						reason = reasonLifetime
					}
					b.evictLocked(be, reason, nil)
				} else if next.IsZero() || at.Before(next) {
					next = at
				}
				be = prev
			}
		})
	}
	if !next.IsZero() {
		b.armReaperLocked(next, now)
	}
	b.unlock()
}

// abandon closes be, checked out by a handle that became garbage without
// giving it back (reclaim.go), and returns its token.
func (b *budget) abandon(be *backend) {
	b.mu.Lock()
	if be.state != backendBusy {
		b.mu.Unlock() // cannot happen: the handle's hold is taken once
		return
	}
	d := be.db
	held := b.clock.Now().Sub(be.checkedOut)
	ws, stack := d.workspace, be.stack
	b.closeBusyLocked(be, reasonAbandoned, nil)
	b.growLocked(d)
	b.unlock()
	if l := b.log.Load(); l != nil {
		attrs := []slog.Attr{slog.String("workspace", ws), slog.Duration("held", held)}
		if len(stack) > 0 {
			attrs = append(attrs, slog.String("stack", formatStack(stack)))
		}
		l.LogAttrs(bg, slog.LevelWarn,
			"tenantpg: closed a connection whose *sql.Rows, *sql.Conn, *sql.Tx or tenantpg.PoolConn was dropped without being closed or released", attrs...)
	}
}

// collectAgain runs on the collector's timer.
func (b *budget) collectAgain() {
	b.mu.Lock()
	b.collector.fired()
	if b.strays > 0 && b.waiting > 0 {
		b.collectLocked(b.clock.Now())
	}
	b.mu.Unlock()
}

// checkLeaks reports the backends checked out for longer than the leak
// threshold, once each, with the stack of the code that checked them out.
// It runs on a timer armed for the oldest watched checkout.
func (b *budget) checkLeaks() {
	type report struct {
		workspace string
		held      time.Duration
		stack     []uintptr
	}
	var reports []report
	b.mu.Lock()
	now := b.clock.Now()
	b.leakCheck.fired()
	th := time.Duration(b.leakThreshold.Load())
	for be := b.watched.front; be != nil; be = b.watched.front {
		if th > 0 && now.Sub(be.checkedOut) < th {
			b.armLeakCheckLocked(be.checkedOut.Add(th), now)
			break // the rest were checked out later
		}
		b.watched.remove(be)
		if th > 0 {
			be.leaked = true
			b.leaks++
			reports = append(reports, report{be.db.workspace, now.Sub(be.checkedOut), be.stack})
		}
	}
	b.unlock()
	l := b.log.Load()
	if l == nil {
		return
	}
	for _, r := range reports {
		attrs := []slog.Attr{slog.String("workspace", r.workspace), slog.Duration("held", r.held), slog.Duration("threshold", th)}
		if len(r.stack) > 0 {
			attrs = append(attrs, slog.String("stack", formatStack(r.stack)))
		}
		l.LogAttrs(bg, slog.LevelWarn, "tenantpg: connection held longer than the leak threshold (a *sql.Rows, *sql.Conn or *sql.Tx not closed?)", attrs...)
	}
}

// reconfigure applies new settings. Lowering the budget or a cap closes
// idle backends down to the new limits at once; busy ones are closed when
// they are checked in. Raising it serves waiters.
func (b *budget) reconfigure(cfg Config) error {
	b.mu.Lock()
	if !maps.Equal(cfg.ServerAliases, b.aliases) && len(b.servers) > 0 {
		b.mu.Unlock()
		return &ConfigError{Field: "ServerAliases",
			Reason: "aliases cannot change while pools are open: their backends count against the server they were opened on"}
	}
	if fleetSettingsOf(cfg) != b.fleet && len(b.servers) > 0 {
		// A server in use would be coordinated only from its next DSN on,
		// with backends no lease covers.
		b.mu.Unlock()
		return &ConfigError{Field: "FleetMaxConnections",
			Reason: "the fleet settings cannot change while databases are open; set them before the first connection"}
	}
	for _, s := range b.servers {
		if limit := serverLimit(cfg.MaxConnections, cfg.ServerMaxConnections, s.label); limit < s.reserved {
			b.mu.Unlock()
			field := "MaxConnections"
			if _, ok := cfg.ServerMaxConnections[s.label]; ok {
				field = "ServerMaxConnections[" + s.label + "]"
			}
			return &ConfigError{Field: field, Reason: errReservedExceedsBudget(limit, s.reserved)}
		}
	}
	b.applyLocked(cfg)
	now := b.clock.Now()
	idle := 0
	for _, s := range b.servers {
		b.shrinkLocked(s)
		b.serveQueueLocked(s)
		idle += s.idle
	}
	for d := range b.dbs {
		b.growLocked(d)
	}
	// The timeouts may have changed. Disarm even with nothing idle: a later
	// check-in skips arming a reaper armed early enough, and the old time
	// may be later than the new idle timeout allows.
	b.reaper.stop()
	if idle > 0 {
		b.armReaperLocked(now, now) // rescan now
	}
	// The leak threshold may have changed too: rescan now (a threshold
	// turned off empties the watch list).
	b.leakCheck.stop()
	if b.watched.len > 0 {
		b.armLeakCheckLocked(now, now)
	}
	b.unlock()
	return nil
}

// close fails every waiter, closes every idle backend and stops the timer.
// Busy backends are closed when they are checked in.
func (b *budget) close() {
	b.mu.Lock()
	if b.closed {
		b.waitDrainsLocked()
		b.mu.Unlock()
		return
	}
	b.closed = true
	b.shut.Store(true)
	for d := range b.dbs {
		for w := d.waiters.front; w != nil; {
			next := d.waiters.next(w)
			b.dequeueLocked(w)
			w.done, w.err = true, errDriverClosed
			close(w.ready)
			w = next
		}
	}
	for _, s := range b.servers {
		s.recency.eachLocked(func(x *backendPool) {
			for x.idleBackends.back != nil {
				b.evictLocked(x.idleBackends.back, reasonDriverClosed, nil)
			}
		})
		s.wake.stop()
	}
	b.reaper.stop()
	b.leakCheck.stop()
	b.collector.stop()
	b.unlock()
	// Never under mu: a collection holds the SDK's pipeline lock while its
	// callback takes mu, and Unregister takes that pipeline lock.
	b.metrics.Load().close()
	b.mu.Lock()
	b.waitDrainsLocked()
	// A draining stop: a fleet's slots go back to the other processes
	// once the server has closed this process's backends on them (busy
	// ones close as they are checked in), or after fleetCloseTimeout.
	var fleets []*fleetCoordinator
	for _, s := range b.servers {
		if s.fleet != nil {
			fleets = append(fleets, s.fleet)
		}
	}
	if len(fleets) > 0 {
		timedOut := false
		t := b.clock.AfterFunc(fleetCloseTimeout, func() {
			b.mu.Lock()
			timedOut = true
			b.drained.Broadcast()
			b.mu.Unlock()
		})
		for !timedOut && b.fleetOpenLocked() {
			b.drained.Wait()
		}
		t.Stop()
	}
	b.mu.Unlock()
	var wg sync.WaitGroup
	for _, f := range fleets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(bg, fleetCloseTimeout)
			defer cancel()
			_ = f.close(ctx)
		}()
	}
	wg.Wait()
}

// isClosed reports whether close was called.
func (b *budget) isClosed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closed
}

// waitDrainsLocked waits until no socket is being drained. Each drain ends
// within drainTimeout.
func (b *budget) waitDrainsLocked() {
	for b.draining > 0 || b.jobs > 0 {
		b.drained.Wait()
	}
}

// snapshot copies the budget's numbers and those of every database that
// holds backends, reserves them or has callers waiting.
func (b *budget) snapshot() snapshot {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.clock.Now()
	s := snapshot{
		waiting: b.waiting, peakOpen: b.peakOpen, dials: b.dials, waitCount: b.waitCount,
		timeouts: b.timeouts, exhausted: b.exhausted, handoffs: b.handoffs, waitDuration: b.waitDuration,
		leaks: b.leaks, collections: b.collections,
		dialTime: b.dialTime.duration(), evictions: b.evictions, dialErrors: b.dialErrors,
	}
	for d := range b.dbs {
		if d.open == 0 && d.reserved == 0 && d.waiters.len == 0 {
			continue
		}
		ds := dbSnapshot{db: d, workspace: d.workspace, name: d.name, open: d.open, inUse: d.inUse, idle: d.idle,
			dialing: d.dialing, closing: d.closing, cap: b.capLocked(d), reserved: d.reserved, waiting: d.waiters.len,
			lastUsed: d.lastUsed, evictions: d.evictions, useTime: d.useTime.duration()}
		if be := d.busy.front; be != nil {
			ds.longestUse = now.Sub(be.checkedOut)
			s.longestUse = max(s.longestUse, ds.longestUse)
		}
		s.dbs = append(s.dbs, ds)
	}
	for _, x := range b.servers {
		ss := serverSnapshot{srv: x, label: x.label, limit: x.limit, reserved: x.reserved, open: x.open, inUse: x.inUse,
			idle: x.idle, dialing: x.dialing, closing: x.closing, peakOpen: x.peakOpen, dialSlots: min(x.pace.slots, x.limit),
			waiting: x.waiting, down: x.down, outages: x.outages, failed: x.failed}
		if x.down {
			ss.since, ss.downFor = x.since, now.Sub(x.since)
			if x.lastErr != nil {
				ss.lastErr = x.lastErr.Error()
			}
		}
		if x.fleet != nil {
			fs := x.fleet.stats() // lock order: budget.mu, then the coordinator's
			ss.fleet = &fs
		}
		s.servers = append(s.servers, ss)
		s.limit += x.limit
		s.reserved += x.reserved
		s.open += x.open
		s.inUse += x.inUse
		s.idle += x.idle
		s.dialing += x.dialing
		s.closing += x.closing
	}
	if len(b.servers) == 0 {
		s.limit = b.limit
	}
	return s
}

// probeDue runs on a server's timer: the next probe may start.
func (b *budget) probeDue(s *server) {
	b.mu.Lock()
	s.wake.fired()
	if b.servers[s.key] == s {
		b.startProbeLocked(s, b.clock.Now())
	}
	b.unlock()
}

// watchDial arms a timer that marks t's server down if t's dial is still
// running after a healthy server would have answered; the caller stops it
// when the dial ends. It also returns that time, by which the connector
// judges a dial its caller's deadline cut short.
func (b *budget) watchDial(t *token) (timer, time.Duration) {
	b.mu.Lock()
	after := b.hungDialAfterLocked(t.db.srv)
	t.dialStart = b.clock.Now()
	b.mu.Unlock()
	return b.clock.AfterFunc(after, func() { b.dialHung(t) }), after
}

// dialHung marks t's server down because t's dial has run too long: the
// host accepted the connection (or the SYN is unanswered) and the server
// does not answer. The dial becomes the probe: no other caller dials until
// it ends.
func (b *budget) dialHung(t *token) {
	b.mu.Lock()
	s := t.db.srv
	if t.dialDone || s == nil || s.down || b.closed || s.answered.After(t.dialStart) {
		// Done, already known down, or the server answered another dial
		// since this one started: it is slow, not hung.
		b.mu.Unlock()
		return
	}
	b.markDownLocked(s, b.clock.Now(), errNotAnswering)
	s.wake.stop()
	s.probing, t.probe = true, true
	srv, ws := s.label, t.db.workspace
	b.unlock()
	b.logServerDown(srv, ws, errNotAnswering)
}

// serverDownError is serverDownErrorLocked for a caller whose own dial found
// the server down as its context ended; nil if the server is up again.
func (b *budget) serverDownError(d *backendPool, waited time.Duration, cause, callerErr error) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if s := d.srv; s == nil || !s.down {
		return nil
	}
	return b.serverDownErrorLocked(d, b.clock.Now(), waited, cause, callerErr)
}

// fleetSide is a server's budget as its fleet coordinator (fleet.go) sees
// it.
type fleetSide struct {
	b *budget
	s *server
}

// fleetNeed is what s holds (closing backends included, as the server
// still counts them) and what its callers that are to dial want, within
// its budget less the coordination session and the cap it yields to.
func (f fleetSide) fleetNeed() int {
	b, s := f.b, f.s
	b.mu.Lock()
	defer b.unlock()
	if b.closed {
		return 0
	}
	now := b.clock.Now()
	if !s.capUntil.IsZero() && !now.Before(s.capUntil) {
		// The yield is over: s may grow back to the slots it holds. The
		// coordinator asks at least once a second, so the cap lasts at
		// most that much longer than fleetYieldFor.
		s.capUntil = time.Time{}
		b.refreshLimitLocked(s, reasonFleet)
	}
	// Reserved tokens a database does not use are held back from the
	// others (roomLocked), so they must be leased too, or the share could
	// sit at or below the reservations and no other database could dial.
	unusedReserved := s.reserved - (s.open - s.sharedInUse)
	need := s.open + s.queue.len - s.claims + unusedReserved
	if now.Before(s.capUntil) {
		need = min(need, max(s.fleetCap, s.open))
	}
	return max(0, min(need, s.max-1))
}

func (f fleetSide) fleetSetHeld(n int) bool {
	b, s := f.b, f.s
	b.mu.Lock()
	defer b.unlock()
	if n < s.open {
		return false
	}
	s.held, s.granted = n, true
	b.refreshLimitLocked(s, reasonFleet)
	return true
}

// fleetYield gives up to n of s's slots to other processes: idle backends
// close at once, down to what its callers use now, and busy ones beyond
// the fair share close as they are checked in, so that a busy process
// keeps its fair share and no more while others need slots. The cap lasts
// fleetYieldFor; the coordinator releases the slots once their backends
// are gone.
func (f fleetSide) fleetYield(n, fair int) {
	b, s := f.b, f.s
	b.mu.Lock()
	defer b.unlock()
	live := s.open - s.closing
	busy := s.inUse + s.dialing + s.queue.len
	keep := min(busy, max(fair, 1))
	give := min(n, live-keep)
	if give <= 0 {
		return
	}
	s.fleetCap = live - give
	s.capUntil = b.clock.Now().Add(fleetYieldFor)
	b.refreshLimitLocked(s, reasonFleet)
}

// fleetLost lowers s to n at once, whatever it holds open: the
// coordination session was lost, or is back with fewer slots than s holds.
// A lost session's slots are free for other processes until it is back, so
// only the role's CONNECTION LIMIT holds the cap meanwhile: s falls back to
// the smaller of its share and n (a fair share), the less to overshoot. A
// process that was never given a share (its coordination session has not
// connected yet) gets n, so that a coordination failure is not an outage.
func (f fleetSide) fleetLost(n int) {
	b, s := f.b, f.s
	b.mu.Lock()
	defer b.unlock()
	if s.granted {
		n = min(s.held, n)
	}
	s.held = n
	b.refreshLimitLocked(s, reasonFleet)
}

// fleetFloor keeps s at n backends at least, leases or not: sessions of
// another role hold the fleet's slots, and without a floor s could be left
// with none. The role's CONNECTION LIMIT still caps the server.
func (f fleetSide) fleetFloor(n int) {
	b, s := f.b, f.s
	b.mu.Lock()
	defer b.unlock()
	s.fleetFloor = n
	b.refreshLimitLocked(s, reasonFleet)
}
