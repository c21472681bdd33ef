package tenantpg

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// The budget is the process-wide (per Driver) count of physical connections
// (backends) to each server, and everything that decides who gets one. A
// token stands for one backend: it is taken before a dial starts and given
// back only after the server has closed that backend's socket, so the
// server never sees more connections than its budget (ledger.go).
//
// The driver owns the backends; database/sql's connections are handles
// (conn.go) that hold a backend only between checkout and check-in. A
// caller that finds no idle backend of its pool queues on the pool and
// waits for one, or dials when its pool should grow (checkout.go); a backend
// checked in goes to the next caller, idle, or closed (checkin.go); a token
// returns once its backend is gone (token.go); a server that does not
// answer is down until a probe gets an answer (outage.go).
//
// The code is in three tiers, around one mutex, budget.mu:
//
//   - Entry points, in this file only: the methods the connector, the
//     handles, the sockets, the timers and the fleet coordinator call. Only
//     they take mu, and every one releases it through unlock, which closes
//     the backends chosen for closing and then logs what happened
//     (events.go), both once mu is released: no network I/O and no logging
//     happens under the lock.
//   - Transitions: the budget's methods whose names end in Locked, called
//     with mu held, grouped by flow (checkout.go, checkin.go, token.go,
//     outage.go, limits.go, register.go, reclaim.go, snapshot.go). They
//     change several components at once and act on their decisions.
//   - Components: plain structs guarded by mu, which never lock, never
//     block and hold no *budget; their methods count and decide, the
//     transitions act, and they carry no Locked suffix. Per server
//     (server.go): its tokens (ledger.go), dial queue (waiter.go), eviction
//     order (lru.go), dial pacing (pace.go), circuit (circuit.go) and fleet
//     lease (fleetlease.go); per pool (backendpool.go): its tokens, queue
//     and growth rule (growth.go); and the budget's counters (snapshot.go),
//     leak watch and stray collector (reclaim.go, next to the transitions
//     that act on them).
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

	// Guarded by mu.
	servers  map[serverKey]*server // every server a pool is on, each with its pools
	poolIDs  uint64                // the last pool id given
	open     int                   // tokens held, over every server
	peakOpen int                   // the most held at once
	waiting  int                   // callers waiting for a backend or a token
	closed   bool
	counters counters
	// dialTime is the driver's EWMA of a dial's duration, what a caller
	// pays for a new backend.
	dialTime ewma
	reaper   wakeup         // closes idle backends past their idle time or lifetime (reclaim.go)
	watch    leakWatch      // backends checked out, watched for leaks (reclaim.go)
	strays   strayCollector // handles of closed connectors, and the collections they trigger (reclaim.go)
	toClose  []closeJob     // chosen for closing under mu, closed by unlock
	events   []event        // to log, by unlock

	shut atomic.Bool // closed, for a check-in that holds no backend

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
	b := &budget{clock: clk, io: io, servers: make(map[serverKey]*server),
		handoffAfter: defaultHandoffAfter, livenessAfter: defaultLivenessAfter, hungDialAfter: defaultHungDialAfter}
	b.drained = sync.NewCond(&b.mu)
	b.reaper.fn = b.reap
	b.tracing.Store(newTracing(cfg.TracerProvider, cfg.TraceQueryText))
	b.watch.timer.fn = b.checkLeaks
	b.strays.timer.fn = b.collectAgain
	b.applyLocked(cfg)
	return b
}

// unlock releases mu, then closes the backends chosen for closing while it
// was held, then logs the events queued meanwhile: no network I/O and no
// logging happens under the lock. Every entry point releases mu through it.
func (b *budget) unlock() {
	if len(b.toClose) == 0 && len(b.events) == 0 {
		b.mu.Unlock() // the common case: one call more than a bare Unlock (unlock is not inlined)
		return
	}
	b.unlockSlow()
}

func (b *budget) unlockSlow() {
	jobs, events := b.toClose, b.events
	b.toClose, b.events = nil, nil
	b.mu.Unlock()
	l := b.log.Load()
	if len(jobs) > 0 {
		logClosing(l, jobs)
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
	if l != nil {
		for i := range events {
			events[i].log(l)
		}
	}
}

// Settings.

// timeout returns the acquire timeout.
func (b *budget) timeout() time.Duration {
	b.mu.Lock()
	defer b.unlock()
	return b.acquireTimeout
}

// settingsLimit returns the budget.
func (b *budget) settingsLimit() int {
	b.mu.Lock()
	defer b.unlock()
	return b.limit
}

// reconfigure applies new settings (limits.go).
func (b *budget) reconfigure(cfg Config) error {
	b.mu.Lock()
	defer b.unlock()
	return b.reconfigureLocked(cfg)
}

// Pools and handles (register.go).

// register makes the pool of a parsed DSN, on its server.
func (b *budget) register(params *dsnParams) (*backendPool, error) {
	b.mu.Lock()
	defer b.unlock()
	if b.closed {
		return nil, errDriverClosed
	}
	return b.registerLocked(params)
}

// names returns p's workspace label and database name.
func (b *budget) names(p *backendPool) (workspace, name string) {
	b.mu.Lock()
	defer b.unlock()
	return p.workspace, p.name
}

// retain counts a new handle of pool p (nil for a router's handle) made by
// o (nil for one that Driver.Open returns). It fails once the driver is
// closed. release undoes it.
func (b *budget) retain(p *backendPool, o *owner) error {
	b.mu.Lock()
	defer b.unlock()
	if b.closed {
		return errDriverClosed
	}
	b.retainLocked(p, o)
	return nil
}

// release undoes retain, when a handle is closed or found to be garbage
// (reclaim.go).
func (b *budget) release(p *backendPool, o *owner) {
	b.mu.Lock()
	defer b.unlock()
	b.releaseHandleLocked(p, o)
}

// closeOwner records that o's *sql.DB or Pool was closed; p, if not nil,
// is o's pool, whose idle backends close now.
func (b *budget) closeOwner(p *backendPool, o *owner) {
	b.mu.Lock()
	defer b.unlock()
	b.closeOwnerLocked(p, o)
}

func (b *budget) unregister(p *backendPool) {
	b.mu.Lock()
	defer b.unlock()
	b.unregisterLocked(p)
}

// releaseIfIdle drops the last reference to p, its router's, when p holds
// no backend and has no caller waiting: a router forgets a workspace that
// has gone quiet, so that serving many workspaces over time does not grow
// memory. A checkout that looked p up before then gets errDBClosed from
// take and looks it up again.
func (b *budget) releaseIfIdle(p *backendPool) bool {
	b.mu.Lock()
	defer b.unlock()
	return b.releaseIfIdleLocked(p)
}

// Checkout (checkout.go).

// take is the start of a checkout of p. It returns the most recently used
// idle backend of p when there is one (the fast path: no allocation, no
// wait), or else a waiter queued on p, which may already hold a token; the
// caller then calls await. now is the checkout time; stack is the caller's
// (captureStack), nil unless leak detection is on.
func (b *budget) take(p *backendPool, now time.Time, stack []uintptr) (*backend, *waiter, error) {
	b.mu.Lock()
	if b.closed {
		b.unlock()
		return nil, nil, errDriverClosed
	}
	if be := p.idleBackends.front; be != nil {
		b.reuseLocked(be, now, stack)
		b.unlock()
		return be, nil, nil
	}
	if p.refs == 0 {
		// Forgotten: its router dropped it, or its Pool was closed,
		// after the caller looked it up.
		b.unlock()
		return nil, nil, errDBClosed
	}
	w := b.queueLocked(p, now, stack)
	b.unlock()
	return nil, w, nil
}

// await waits until w is served: with a backend another caller checked in,
// or with a token to dial one. ctx bounds the wait; caller is the context
// the application passed, to tell its cancellation from the acquire
// timeout.
func (b *budget) await(ctx, caller context.Context, w *waiter) (*backend, *token, error) {
	defer b.unregister(w.db)
	select {
	case <-w.ready:
		if w.err != nil {
			return nil, nil, w.err
		}
		b.metrics.Load().recordWait(b.clock.Now().Sub(w.since))
		return w.be, w.tok, nil
	case <-ctx.Done():
	}
	deadline := errors.Is(ctx.Err(), context.DeadlineExceeded)
	b.mu.Lock()
	now := b.clock.Now()
	if w.done && w.err != nil {
		b.unlock()
		return nil, nil, w.err
	}
	err := b.giveUpLocked(w, now, deadline, caller.Err())
	b.unlock()
	m := b.metrics.Load()
	m.recordWait(now.Sub(w.since))
	if deadline {
		m.recordTimeout()
	}
	return nil, nil, err
}

// impatient runs on w's patience timer: it has waited as long as a dial
// takes.
func (b *budget) impatient(w *waiter) {
	b.mu.Lock()
	defer b.unlock()
	b.impatientLocked(w)
}

// discard closes a backend a checkout found dead before using it.
func (b *budget) discard(be *backend) {
	b.mu.Lock()
	defer b.unlock()
	b.discardLocked(be)
}

// Check-in (checkin.go).

// checkin takes back a backend its handle is done with.
func (b *budget) checkin(be *backend) {
	now := b.clock.Now()
	b.mu.Lock()
	used := now.Sub(be.checkedOut)
	if be.leaked {
		b.eventLocked(event{kind: evLeakReturned, workspace: be.db.workspace, held: used})
	}
	b.checkinLocked(be, now, true)
	b.unlock()
	b.metrics.Load().recordUse(used)
}

// Dials (token.go).

// dialed records a successful dial: the new backend is checked out by the
// caller that dialed it. It returns nil when the driver was closed
// meanwhile, after closing the backend.
func (b *budget) dialed(t *token, be *backend, took time.Duration) *backend {
	b.mu.Lock()
	defer b.unlock()
	if !b.dialedLocked(t, be, took) {
		return nil
	}
	return be
}

// dialFailed records a failed dial; the token returns once any socket the
// dial opened has been drained.
func (b *budget) dialFailed(t *token, kind dialErrorKind, cause error) {
	b.mu.Lock()
	defer b.unlock()
	b.dialFailedLocked(t, kind, cause)
}

// countRejection records a dial the server refused for lack of slots.
func (b *budget) countRejection() {
	b.mu.Lock()
	defer b.unlock()
	b.counters.dialErrors[dialRejected]++
}

// relieveServer closes the least recently used idle backend on p's server,
// because the server refused a dial of p for lack of connection slots: its
// limit is below the budget (other clients, a role or database CONNECTION
// LIMIT). It returns a channel closed once that backend is gone, or nil
// when nothing idle can be closed.
func (b *budget) relieveServer(p *backendPool) <-chan struct{} {
	b.mu.Lock()
	defer b.unlock()
	return b.relieveServerLocked(p)
}

// watchDial arms a timer that marks t's server down if t's dial is still
// running after a healthy server would have answered; the caller stops it
// when the dial ends. It also returns that time, by which the connector
// judges a dial its caller's deadline cut short.
func (b *budget) watchDial(t *token) (timer, time.Duration) {
	b.mu.Lock()
	after := b.hungDialAfterLocked(t.db.srv)
	t.dialStart = b.clock.Now()
	b.unlock()
	return b.clock.AfterFunc(after, func() { b.dialHung(t) }), after
}

// dialHung runs on watchDial's timer (outage.go).
func (b *budget) dialHung(t *token) {
	b.mu.Lock()
	defer b.unlock()
	b.dialHungLocked(t)
}

// Sockets (socket.go).

// socketOpened counts a socket dialed for t.
func (b *budget) socketOpened(t *token, s *trackedConn) {
	b.mu.Lock()
	defer b.unlock()
	t.sockets++
	t.sock = s
}

// drainStarted counts a socket whose drain began, so that close can wait
// for it.
func (b *budget) drainStarted() {
	b.mu.Lock()
	defer b.unlock()
	b.draining++
}

// socketDrained counts a socket dialed for t whose drain ended; t returns
// once its owner is done and its last socket drained.
func (b *budget) socketDrained(t *token) {
	b.mu.Lock()
	defer b.unlock()
	b.socketDrainedLocked(t)
}

// Servers (outage.go).

// probeDue runs on a server's timer: the next probe may start.
func (b *budget) probeDue(s *server) {
	b.mu.Lock()
	defer b.unlock()
	s.circuit.wake.fired()
	if b.servers[s.key] == s {
		b.startProbeLocked(s, b.clock.Now())
	}
}

// serverDownError is serverDownErrorLocked for a caller whose own dial found
// the server down as its context ended; nil if the server is up again.
func (b *budget) serverDownError(p *backendPool, waited time.Duration, cause, callerErr error) error {
	b.mu.Lock()
	defer b.unlock()
	if s := p.srv; s == nil || !s.circuit.down {
		return nil
	}
	return b.serverDownErrorLocked(p, b.clock.Now(), waited, cause, callerErr)
}

// knownDown returns the error of a routed DB's health check while the
// circuit of the server its DSN's host and port count against knows it is
// down, as of now; nil otherwise (router.ping).
func (b *budget) knownDown(host string, port uint16, database string, now time.Time) *ServerDownError {
	b.mu.Lock()
	defer b.unlock()
	s := b.servers[b.serverKeyLocked(serverKey{host: host, port: port})]
	if s == nil || !s.circuit.down {
		return nil
	}
	c := &s.circuit
	return &ServerDownError{Database: database, Server: s.label, Down: now.Sub(c.since), Waiting: s.waiting, Err: c.lastErr}
}

// Timers of reclaim.go.

// reap runs on the reaper's timer.
func (b *budget) reap() {
	b.mu.Lock()
	defer b.unlock()
	b.reapLocked(b.clock.Now())
}

// abandon closes be, checked out by a handle that became garbage without
// giving it back (reclaim.go), and returns its token.
func (b *budget) abandon(be *backend) {
	b.mu.Lock()
	defer b.unlock()
	if be.state == backendBusy { // always: the handle's hold is taken once
		b.abandonLocked(be, b.clock.Now())
	}
}

// collectAgain runs on the stray collector's timer.
func (b *budget) collectAgain() {
	b.mu.Lock()
	defer b.unlock()
	b.strays.timer.fired()
	if b.strays.count > 0 && b.waiting > 0 {
		b.collectLocked(b.clock.Now())
	}
}

// checkLeaks runs on the leak watch's timer, armed for the oldest watched
// checkout.
func (b *budget) checkLeaks() {
	b.mu.Lock()
	defer b.unlock()
	b.checkLeaksLocked(b.clock.Now())
}

// Stats and metrics (snapshot.go).

// snapshot copies the budget's numbers and those of every pool that holds
// backends, reserves them or has callers waiting.
func (b *budget) snapshot() snapshot {
	b.mu.Lock()
	defer b.unlock()
	return b.snapshotLocked()
}

// Driver.Close.

// close fails every waiter, closes every idle backend and stops the timers.
// Busy backends are closed when they are checked in. It returns once the
// server has closed the backends it closed, and a fleet's coordination has
// given its slots back.
func (b *budget) close() {
	b.mu.Lock()
	if b.closed {
		b.waitDrainsLocked()
		b.unlock()
		return
	}
	b.closed = true
	b.shut.Store(true)
	for _, s := range b.servers {
		for p := s.pools.front; p != nil; p = s.pools.next(p) {
			for w := p.waiters.front; w != nil; {
				next := p.waiters.next(w)
				b.dequeueLocked(w)
				w.err = errDriverClosed
				w.finish()
				w = next
			}
		}
	}
	for _, s := range b.servers {
		s.recency.each(func(x *backendPool) {
			for x.idleBackends.back != nil {
				b.evictLocked(x.idleBackends.back, reasonDriverClosed, nil)
			}
		})
		s.circuit.wake.stop()
	}
	b.reaper.stop()
	b.watch.timer.stop()
	b.strays.timer.stop()
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
		if s.lease.coord != nil {
			fleets = append(fleets, s.lease.coord)
		}
	}
	if len(fleets) > 0 {
		timedOut := false
		t := b.clock.AfterFunc(fleetCloseTimeout, func() {
			b.mu.Lock()
			timedOut = true
			b.drained.Broadcast()
			b.unlock()
		})
		for !timedOut && b.fleetOpenLocked() {
			b.drained.Wait()
		}
		t.Stop()
	}
	b.unlock()
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
	defer b.unlock()
	return b.closed
}

// waitDrainsLocked waits until no socket is being drained. Each drain ends
// within drainTimeout.
func (b *budget) waitDrainsLocked() {
	for b.draining > 0 || b.jobs > 0 {
		b.drained.Wait()
	}
}

// The fleet coordinator's calls (fleet.go, limits.go).

// fleetSide is a server's budget as its fleet coordinator sees it.
type fleetSide struct {
	b *budget
	s *server
}

// fleetNeed is how many slots s should lease now: what it holds (closing
// backends included, as the server still counts them) and what its callers
// that are to dial want, within its budget less the coordination session
// and the cap it yields to.
func (f fleetSide) fleetNeed() int {
	b := f.b
	b.mu.Lock()
	defer b.unlock()
	if b.closed {
		return 0
	}
	return b.fleetNeedLocked(f.s, b.clock.Now())
}

func (f fleetSide) fleetSetHeld(n int) bool {
	b := f.b
	b.mu.Lock()
	defer b.unlock()
	return b.fleetSetHeldLocked(f.s, n)
}

// fleetYield gives up to n of s's slots to other processes, keeping the
// fair share while its callers use it.
func (f fleetSide) fleetYield(n, fair int) {
	b := f.b
	b.mu.Lock()
	defer b.unlock()
	b.fleetYieldLocked(f.s, n, fair)
}

// fleetLost lowers s to n at once, whatever it holds open: the
// coordination session was lost, or is back with fewer slots than s holds.
func (f fleetSide) fleetLost(n int) {
	b := f.b
	b.mu.Lock()
	defer b.unlock()
	b.fleetLostLocked(f.s, n)
}

// fleetFloor keeps s at n backends at least, leases or not: sessions of
// another role hold the fleet's slots, and without a floor s could be left
// with none. The role's CONNECTION LIMIT still caps the server.
func (f fleetSide) fleetFloor(n int) {
	b := f.b
	b.mu.Lock()
	defer b.unlock()
	b.fleetFloorLocked(f.s, n)
}
