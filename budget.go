package tenantpg

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/stdlib"
)

// The budget is the process-wide (per Driver) count of physical connections.
// A token stands for one server backend: it is taken before a dial starts and
// given back only after the server has closed that backend's socket, so the
// server never sees more connections than the budget.
//
// Each database may set aside reserved tokens that only it can use; the rest
// form the shared pool. A database's tokens count against its reservation
// first, so sharedInUse == Σ max(0, db.open - db.reserved). Tokens of
// connections being closed still count, as their backends still count on
// the server; sharedLive leaves them out, to tell whether the shared pool
// is over a lowered budget once those are gone.
//
// When the shared pool is empty, the idle connection of the least recently
// used database is closed and its token handed to the caller that needs one
// (an eviction). Recency is segmented (SLRU): a database whose idle
// connection was reused is protected, and databases on probation, which got
// connections and have not reused one, are evicted first. A long tail of
// workspaces each seen once then cycles through probation instead of
// evicting the connections hot workspaces reuse; the protected segment is
// bounded, so a workspace that cooled off is demoted and evicted in turn. When nothing idle can be closed, callers queue in arrival
// order until a token frees, their context ends, or the acquire timeout
// passes.
//
// Locking: one mutex, budget.mu, guards all of it, including every
// database's counters and lists and every conn's state transitions. It is
// never held during network I/O: connections chosen for closing under the
// lock are queued in toClose and closed by unlock. Code that only needs to
// know a conn is checked out reads conn.state atomically without the lock.
type budget struct {
	mu sync.Mutex

	// Settings; guarded by mu.
	limit          int
	perDB          int
	lifetime       time.Duration
	idleTimeout    time.Duration
	acquireTimeout time.Duration
	grace          time.Duration
	handoffAfter   time.Duration
	livenessAfter  time.Duration

	// Token accounting; guarded by mu.
	reserved    int // Σ database.reserved
	sharedInUse int // tokens held beyond reservations
	sharedLive  int // Σ max(0, db.open - db.closing - db.reserved)
	open        int // tokens held: dialing, in use, idle or closing
	dialing     int
	inUse       int
	idle        int
	closing     int // tokens whose connection is being torn down
	peakOpen    int

	dbs     map[dbKey]*database
	waiters list[waiter, *waiter] // callers waiting for a token, oldest first
	closed  bool

	// Databases with idle conns, most recently used first, in two
	// segments: probation (no reuse yet) is evicted before protected.
	probation list[database, *database]
	protected list[database, *database]
	// protectedOpen is Σ db.open over protected databases; above
	// protectedLimit the least recently used protected database is demoted.
	protectedOpen int

	fresh list[conn, *conn] // connections not used since their dial, oldest first

	toClose []closeJob // chosen for closing under mu; closed by unlock

	reaper     wakeup // closes connections past their idle time or lifetime
	graceEnded wakeup // lets waiters evict a connection whose grace period ended

	// Cumulative counters; guarded by mu.
	waitCount    uint64
	waitDuration time.Duration
	timeouts     uint64
	evictions    [numReasons]uint64
	dials        uint64
	exhausted    uint64 // BudgetErrors returned
	// staleCheckouts counts checkouts of connections the driver had
	// evicted: database/sql retried them elsewhere.
	staleCheckouts uint64
	dialErrors     [numDialErrorKinds]uint64

	// draining counts sockets being drained after close; drained is
	// signalled when it drops to zero. Guarded by mu.
	draining int
	drained  *sync.Cond
	jobs     int // close jobs chosen under mu whose pc.Close has not returned

	metrics atomic.Pointer[metrics]
	log     atomic.Pointer[slog.Logger] // nil: no logging
}

// closeJob is a connection chosen for closing under mu and closed by unlock.
type closeJob struct {
	pc        *stdlib.Conn
	tok       *token
	reason    evictReason
	workspace string
}

// database is the state shared by every connector for one server, user and
// database. All fields after the first block are guarded by budget.mu.
type database struct {
	key  dbKey
	name string

	workspace   string
	capOverride int // pool_max_conns; 0 = the driver's per-database default
	reserved    int // pool_reserved_conns
	refs        int // connectors that use this state

	open      int // tokens held by this database
	dialing   int
	inUse     int
	idle      int
	closing   int
	lastUsed  time.Time
	evictions uint64
	waiting   int               // callers waiting for a token for this database
	idleConns list[conn, *conn] // most recently checked in first
	// busy holds the connections database/sql has checked out, oldest
	// checkout first, so that Stats can name a connection held for
	// minutes (a leaked *sql.Conn, Rows or Tx) without a scan.
	busy list[conn, *conn]

	metricOpts *dbMetricOpts   // built on first collection while it holds connections
	lru        links[database] // in budget.probation or budget.protected while it has idle conns
	// protected: one of its idle connections was reused since it last had
	// none. Cleared when it holds no connection or is demoted.
	protected bool
}

func (d *database) lnk() *links[database] { return &d.lru }

// waiter is a caller queued for a token.
type waiter struct {
	db      *database
	since   time.Time
	ready   chan struct{} // closed once granted (or failed, with err set)
	granted bool
	err     error
	claim   *token // a closing connection whose token is promised to this waiter
	link    links[waiter]
}

func (w *waiter) lnk() *links[waiter] { return &w.link }

// token tracks one physical connection's claim on the budget from the start
// of its dial until the server has closed every socket dialed for it.
// Fields are guarded by budget.mu.
type token struct {
	db       *database
	sock     *trackedConn // the last socket dialed for it: the connection's own
	sockets  int          // sockets dialed for this token and not yet drained
	ended    bool         // the owner is done: dial failed or the connection closed
	released bool
	claim    *waiter       // the waiter that gets this token when it is released
	gone     chan struct{} // made on demand; closed when the token is released
}

// Conn states. A conn starts fresh, becomes busy at its first use, idle at
// check-in (IsValid) and busy again at checkout (ResetSession or any other
// driver call). Transitions happen under budget.mu; a busy conn is only ever
// changed by database/sql's own calls, which it serialises per connection, so
// reading "busy" without the lock is safe.
//
// A fresh conn may be anywhere: with the caller that dialed it, in
// database/sql's free list (its opener dialed it for a caller who was served
// by another connection meanwhile), or pinned by db.Conn and not used yet.
// database/sql calls nothing on it in any of these places, so the driver
// cannot tell them apart. Left alone, fresh conns in free lists can hold the
// whole budget while the callers of those same databases wait in Connect.
// So a fresh conn past the grace period may be evicted like an idle one, and
// because it has no session state yet, its next use dials a new connection in
// its place (stateRedial) instead of failing.
const (
	stateFresh   int32 = iota
	stateBusy          // checked out by database/sql
	stateIdle          // in database/sql's free list; may be evicted after the grace period
	stateDoomed        // IsValid answered false; database/sql will call Close
	stateEvicted       // the driver closed it; database/sql's Close is a no-op
	stateRedial        // the driver closed it while fresh; its next use dials again
	stateClosed        // Close was called
)

type evictReason uint8

// Reasons the driver closes a connection. reasonNone is a close asked for by
// database/sql or the application.
const (
	reasonNone         evictReason = iota
	reasonLRU                      // idle, closed to give its token to another database
	reasonHandoff                  // closed at check-in because a caller was waiting for its token
	reasonIdleTimeout              // idle for longer than ConnMaxIdleTime
	reasonLifetime                 // older than ConnMaxLifetime
	reasonBudgetShrink             // the budget or a per-database cap was lowered
	reasonBroken                   // the connection was found closed or broken
	reasonDriverClosed             // Driver.Close
	reasonServerFull               // idle, closed because the server refused a dial for lack of slots
	numReasons
)

var reasonNames = [numReasons]string{"", "lru", "handoff", "idle_timeout", "lifetime", "budget_shrink", "broken", "driver_closed", "server_full"}

type dialErrorKind uint8

const (
	dialRejected dialErrorKind = iota // the server refused: too many connections (SQLSTATE 53300)
	dialOther
	numDialErrorKinds
)

// errDriverClosed is returned to callers waiting when the driver closes.
var errDriverClosed = errors.New("tenantpg: driver closed")

func newBudget(cfg Config) *budget {
	b := &budget{dbs: make(map[dbKey]*database), grace: defaultHandoffGrace, handoffAfter: defaultHandoffAfter,
		livenessAfter: defaultLivenessAfter}
	b.drained = sync.NewCond(&b.mu)
	b.reaper.fn = b.reap
	b.graceEnded.fn = b.graceExpired
	b.apply(cfg)
	return b
}

func (b *budget) apply(cfg Config) {
	b.limit = cfg.MaxConnections
	b.perDB = cfg.MaxConnectionsPerDB
	b.lifetime = cfg.ConnMaxLifetime
	b.idleTimeout = cfg.ConnMaxIdleTime
	b.acquireTimeout = cfg.AcquireTimeout
	b.log.Store(cfg.Logger)
}

// unlock releases mu and then closes the connections chosen for closing
// while it was held, so that no network I/O happens under the lock.
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
		l.LogAttrs(bg, slog.LevelDebug, "tenantpg: closing idle connections",
			slog.String("reason", reasonNames[jobs[0].reason]), slog.Int("count", len(jobs)), slog.Any("workspaces", workspaces))
	}
	for _, j := range jobs {
		if j.pc != nil { // nil only in the state-machine fuzz test
			_ = j.pc.Close()
		}
		// The token returns once the socket is drained, or now if pgx had
		// closed it already (a broken connection).
		b.mu.Lock()
		b.jobs--
		if b.jobs == 0 && b.draining == 0 {
			b.drained.Broadcast()
		}
		b.endLocked(j.tok)
		b.unlock()
	}
}

func (b *budget) capOf(d *database) int {
	c := b.perDB
	if d.capOverride > 0 {
		c = d.capOverride
	}
	if c > b.limit {
		c = b.limit
	}
	if c < d.reserved {
		c = d.reserved
	}
	return c
}

// roomLocked reports whether d may take a token now without evicting.
func (b *budget) roomLocked(d *database) bool {
	return b.open < b.limit && (d.open < d.reserved || b.sharedInUse < b.limit-b.reserved)
}

// liveShared is d's part of sharedLive.
func liveShared(d *database) int { return max(0, d.open-d.closing-d.reserved) }

func (b *budget) takeLocked(d *database) {
	old := liveShared(d)
	if d.protected {
		b.protectedOpen++
	}
	d.open++
	b.sharedLive += liveShared(d) - old
	b.open++
	if d.open > d.reserved {
		b.sharedInUse++
	}
	if b.open > b.peakOpen {
		b.peakOpen = b.open
	}
}

func (b *budget) giveLocked(d *database) {
	if d.open > d.reserved {
		b.sharedInUse--
	}
	old := liveShared(d)
	if d.protected {
		b.protectedOpen--
		if d.open == 1 {
			d.protected = false // out of the cache: a new arrival starts on probation
		}
	}
	d.open--
	b.sharedLive += liveShared(d) - old
	b.open--
}

// acquire takes a token for d, waiting in line when there is none. ctx bounds
// the wait; caller is the context the application passed, used to tell its
// cancellation from the driver's own acquire timeout.
func (b *budget) acquire(ctx, caller context.Context, d *database) (*token, error) {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil, errDriverClosed
	}
	if d.open < b.capOf(d) && b.roomLocked(d) {
		b.takeLocked(d)
		b.dialingLocked(d)
		b.mu.Unlock()
		b.metrics.Load().recordWait(0)
		return &token{db: d}, nil
	}
	w := &waiter{db: d, since: time.Now(), ready: make(chan struct{})}
	d.refs++ // a waiter keeps its database's state alive
	d.waiting++
	defer b.unregister(d)
	b.waiters.pushBack(w)
	b.waitCount++
	b.serveWaitersLocked()
	b.unlock()

	select {
	case <-w.ready:
		if w.err != nil {
			return nil, w.err
		}
		b.metrics.Load().recordWait(time.Since(w.since))
		return &token{db: d}, nil
	case <-ctx.Done():
	}

	b.mu.Lock()
	if w.granted {
		if w.err != nil {
			b.mu.Unlock()
			return nil, w.err
		}
		// The grant raced with the end of the wait: give the token straight back.
		d.dialing--
		b.dialing--
		b.giveLocked(d)
		b.serveWaitersLocked()
	} else {
		b.waiters.remove(w)
		d.waiting--
		if w.claim != nil {
			w.claim.claim = nil
			w.claim = nil
		}
	}
	waited := time.Since(w.since)
	if !w.granted {
		b.waitDuration += waited
	}
	deadline := errors.Is(ctx.Err(), context.DeadlineExceeded)
	if deadline {
		b.timeouts++
	}
	b.exhausted++
	e := &BudgetError{
		Workspace: d.workspace, Database: d.name,
		Open: b.open, Limit: b.limit,
		DatabaseOpen: d.open, DatabaseCap: b.capOf(d),
		Waiting: b.waiters.len, Waited: waited,
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
	return nil, e
}

func (b *budget) dialingLocked(d *database) {
	d.dialing++
	b.dialing++
	b.dials++
}

func (b *budget) grantLocked(w *waiter, now time.Time) {
	w.db.waiting--
	b.takeLocked(w.db)
	b.dialingLocked(w.db)
	w.granted = true
	b.waiters.remove(w)
	b.waitDuration += now.Sub(w.since)
	close(w.ready)
}

// serveWaitersLocked gives free tokens to waiters in arrival order and, for
// waiters that no free token can serve, starts evicting the least recently
// used idle connections, each promised to one waiter. It runs after every
// event that can make room: a token released, a waiter added, a reservation
// or the budget changed, the hand-off grace period of an idle conn ended.
func (b *budget) serveWaitersLocked() {
	if b.waiters.len == 0 {
		return
	}
	now := time.Now()
	var retryAt time.Time
	for w := b.waiters.front; w != nil; {
		next := b.waiters.next(w)
		if w.claim != nil && w.db.open < b.capOf(w.db) && b.roomLocked(w.db) {
			// A token freed before the claimed one: take it, and let the
			// claimed one go to whoever is first when it is released.
			w.claim.claim = nil
			w.claim = nil
			b.grantLocked(w, now)
		} else if w.claim == nil {
			d := w.db
			if d.open >= b.capOf(d) {
				// At its own cap: only closing one of its own idle or
				// unused connections helps, which happens when several
				// *sql.DB share one database.
				if v, at := b.ownVictimLocked(d, now); v != nil {
					b.evictLocked(v, reasonLRU, w)
				} else if !at.IsZero() && (retryAt.IsZero() || at.Before(retryAt)) {
					retryAt = at
				}
			} else if b.roomLocked(d) {
				b.grantLocked(w, now)
			} else if v, at := b.victimLocked(now); v != nil {
				b.evictLocked(v, reasonLRU, w)
			} else {
				if !at.IsZero() && (retryAt.IsZero() || at.Before(retryAt)) {
					retryAt = at
				}
				if b.reserved == 0 {
					break // no later waiter can be served either
				}
			}
		}
		w = next
	}
	if !retryAt.IsZero() {
		b.armGraceLocked(retryAt, now)
	}
}

func (b *budget) pastGrace(c *conn, now time.Time) bool {
	return now.Sub(c.idleSince) >= b.grace
}

// ownVictimLocked returns d's own connection to close for a waiter of d at
// its cap: its oldest idle one, or one it never used.
func (b *budget) ownVictimLocked(d *database, now time.Time) (*conn, time.Time) {
	var retryAt time.Time
	if v := b.oldestIdleLocked(d); v != nil {
		if b.pastGrace(v, now) {
			return v, time.Time{}
		}
		retryAt = v.idleSince.Add(b.grace)
	}
	for v := b.fresh.front; v != nil; v = b.fresh.next(v) {
		if v.db != d {
			continue
		}
		if at := v.created.Add(b.grace); now.Before(at) {
			if retryAt.IsZero() || at.Before(retryAt) {
				retryAt = at
			}
			break
		}
		return v, time.Time{}
	}
	return nil, retryAt
}

// oldestIdleLocked returns d's longest-idle connection that no statement
// close is using right now.
func (b *budget) oldestIdleLocked(d *database) *conn {
	for v := d.idleConns.back; v != nil; v = d.idleConns.prev(v) {
		if !v.inOp {
			return v
		}
	}
	return nil
}

// victimLocked returns the idle connection to close to free a shared token:
// the oldest idle connection of the least recently used database. It skips
// databases whose connections all sit within their reservation (closing one
// would free no shared token) and connections still within the hand-off
// grace period, for which it reports when the earliest becomes eligible.
// Databases on probation go first. Only databases with idle connections are
// in the recency lists, so the walk is bounded by the budget, not by the
// number of databases, and usually stops at the first.
func (b *budget) victimLocked(now time.Time) (*conn, time.Time) {
	var retryAt time.Time
	for _, l := range b.recency() {
		for x := l.back; x != nil; x = l.prev(x) {
			if x.open-x.closing <= x.reserved {
				continue
			}
			v := b.oldestIdleLocked(x)
			if v == nil {
				continue
			}
			if !b.pastGrace(v, now) {
				at := v.idleSince.Add(b.grace)
				if retryAt.IsZero() || at.Before(retryAt) {
					retryAt = at
				}
				continue
			}
			return v, time.Time{}
		}
	}
	for v := b.fresh.front; v != nil; v = b.fresh.next(v) {
		x := v.db
		if x.open-x.closing <= x.reserved {
			continue
		}
		if at := v.created.Add(b.grace); now.Before(at) {
			if retryAt.IsZero() || at.Before(retryAt) {
				retryAt = at
			}
			break // the rest are younger
		}
		return v, time.Time{}
	}
	return nil, retryAt
}

// evictLocked marks idle conn v for closing by the driver. If w is not nil,
// v's token goes to w once the server has closed v's backend.
func (b *budget) evictLocked(v *conn, reason evictReason, w *waiter) {
	if v.state.Load() == stateFresh {
		b.fresh.remove(v)
		v.db.inUse--
		b.inUse--
	} else {
		b.unlinkIdleLocked(v)
	}
	if v.used {
		v.state.Store(stateEvicted)
	} else {
		// Never used, so without session state: its next use, if any
		// (it may be pinned by db.Conn), dials again in its place.
		v.state.Store(stateRedial)
	}
	t := v.tok
	if w != nil {
		t.claim = w
		w.claim = t
	}
	b.countEvictionLocked(v.db, reason)
	b.markClosingLocked(t)
	b.jobs++
	b.toClose = append(b.toClose, closeJob{pc: v.pc, tok: t, reason: reason, workspace: v.db.workspace})
}

func (b *budget) countEvictionLocked(d *database, reason evictReason) {
	if reason != reasonNone {
		b.evictions[reason]++
		d.evictions++
	}
}

func (b *budget) markClosingLocked(t *token) {
	old := liveShared(t.db)
	t.db.closing++
	b.sharedLive += liveShared(t.db) - old
	b.closing++
}

// unlinkIdleLocked takes idle conn c out of the idle lists without touching
// its database's recency.
func (b *budget) unlinkIdleLocked(c *conn) {
	d := c.db
	d.idleConns.remove(c)
	d.idle--
	b.idle--
	if d.idleConns.len == 0 {
		b.recencyOf(d).remove(d)
	}
}

// recency returns the recency lists in eviction order.
func (b *budget) recency() [2]*list[database, *database] {
	return [2]*list[database, *database]{&b.probation, &b.protected}
}

// recencyOf returns the recency list d belongs in.
func (b *budget) recencyOf(d *database) *list[database, *database] {
	if d.protected {
		return &b.protected
	}
	return &b.probation
}

// touchLocked moves d, which has idle conns, to the front of its segment.
func (b *budget) touchLocked(d *database) {
	l := b.recencyOf(d)
	if d.lru.listed {
		l.moveToFront(d)
	} else {
		l.pushFront(d)
	}
}

// reusedLocked records a hit: an idle connection of d was checked out
// again. A database on probation is promoted; when that makes the protected
// segment hold more than its share of the budget, the least recently used
// protected database with idle connections goes back on probation.
func (b *budget) reusedLocked(d *database) {
	if !d.protected {
		if d.lru.listed {
			b.probation.remove(d)
		}
		d.protected = true
		b.protectedOpen += d.open
		// One demotion per promotion, as in SLRU: databases whose
		// connections are all busy count but cannot be demoted, and
		// demoting until under the limit could empty the segment.
		if x := b.protected.back; x != nil && b.protectedOpen > b.protectedLimit() {
			b.protected.remove(x)
			x.protected = false
			b.protectedOpen -= x.open
			b.probation.pushFront(x)
		}
	}
	if d.idleConns.len > 0 {
		b.touchLocked(d)
	}
}

// protectedLimit is the protected segment's share of the budget: 80%, the
// usual SLRU split; on a Zipf(1.1) trace over 400 databases it measured
// 58% hits with 20 slots where plain LRU measured 48%.
func (b *budget) protectedLimit() int { return max(1, b.limit*4/5) }

// endLocked records that the owner of t is done with it; the token returns
// once every socket dialed for it has been drained.
func (b *budget) endLocked(t *token) {
	t.ended = true
	if t.sockets == 0 {
		b.releaseLocked(t)
	}
}

// socketOpened and socketDrained count the sockets dialed under t.
func (b *budget) socketOpened(t *token, s *trackedConn) {
	b.mu.Lock()
	t.sockets++
	t.sock = s
	b.mu.Unlock()
}

// countRejection records a dial the server refused for lack of slots.
func (b *budget) countRejection() {
	b.mu.Lock()
	b.dialErrors[dialRejected]++
	b.mu.Unlock()
}

// relieveServer closes the least recently used idle connection, because the server refused a dial of d for lack of
// connection slots: the server's limit is below the budget (other clients,
// a role or database CONNECTION LIMIT). It returns a channel closed once
// that backend is gone, or nil when nothing idle can be closed.
func (b *budget) relieveServer(d *database) <-chan struct{} {
	b.mu.Lock()
	v, _ := b.victimLocked(time.Now())
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

// countBroken records a connection found dead at checkout.
func (b *budget) countBroken(c *conn) {
	b.mu.Lock()
	b.countEvictionLocked(c.db, reasonBroken)
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

// releaseLocked returns t to the budget: to the waiter it was promised to
// when that waiter can use it, otherwise to whoever is first in line.
func (b *budget) releaseLocked(t *token) {
	if t.released {
		return
	}
	t.released = true
	if t.gone != nil {
		close(t.gone)
	}
	d := t.db
	old := liveShared(d)
	d.closing--
	b.sharedLive += liveShared(d) - old
	b.closing--
	b.giveLocked(d)
	now := time.Now()
	if w := t.claim; w != nil {
		t.claim = nil
		w.claim = nil
		if !w.granted && w.db.open < b.capOf(w.db) && b.roomLocked(w.db) {
			b.grantLocked(w, now)
		}
	}
	b.serveWaitersLocked()
	b.forgetLocked(d)
}

// forgetLocked drops the state of a database no connector uses and that
// holds no connection, so that opening many databases over time does not
// grow memory.
func (b *budget) forgetLocked(d *database) {
	if d.refs == 0 && d.open == 0 && b.dbs[d.key] == d {
		b.reserved -= d.reserved
		d.reserved = 0
		delete(b.dbs, d.key)
		b.serveWaitersLocked()
	}
}

// connected records a successful dial of a new conn, which starts fresh. It
// reports false when the driver was closed meanwhile; the caller then closes
// the connection.
func (b *budget) connected(c *conn) bool {
	b.mu.Lock()
	b.dialedLocked(c.db)
	c.db.refs++ // released by closeConn
	if b.closed {
		c.state.Store(stateBusy)
		b.mu.Unlock()
		return false
	}
	c.state.Store(stateFresh)
	b.fresh.pushBack(c)
	if b.waiters.len > 0 {
		b.armGraceLocked(c.created.Add(b.grace), time.Now())
	}
	b.armReaperLocked(c.created.Add(b.idleTimeout), time.Now())
	b.mu.Unlock()
	return true
}

// redialed puts a new physical connection under conn c, whose old one the
// driver evicted before c was ever used.
func (b *budget) redialed(c *conn, pc *stdlib.Conn, tok *token, created time.Time) bool {
	b.mu.Lock()
	b.dialedLocked(c.db)
	c.pc, c.tok, c.created = pc, tok, created
	c.state.Store(stateBusy)
	c.used = true
	c.checkedOut = created
	c.db.busy.pushBack(c)
	closed := b.closed
	b.mu.Unlock()
	return !closed
}

func (b *budget) dialedLocked(d *database) {
	d.dialing--
	b.dialing--
	d.inUse++
	b.inUse++
}

// dialFailed records a failed dial; the token returns once any socket the
// dial opened has been drained.
func (b *budget) dialFailed(t *token, kind dialErrorKind, cause error) {
	b.mu.Lock()
	d := t.db
	d.dialing--
	b.dialing--
	if kind != dialRejected { // rejections are counted as they happen, retries included
		b.dialErrors[kind]++
	}
	b.markClosingLocked(t)
	b.endLocked(t)
	ws := d.workspace
	b.unlock()
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

// checkin is called from IsValid when database/sql takes a connection back.
// It reports whether database/sql may keep it; when it may not, database/sql
// closes it, which is how a busy connection is reclaimed without ever being
// closed under a caller.
func (b *budget) checkin(c *conn) bool {
	now := time.Now()
	b.mu.Lock()
	switch c.state.Load() {
	case stateFresh:
		b.fresh.remove(c) // returned without ever being used
	case stateBusy:
		c.db.busy.remove(c)
	default:
		b.mu.Unlock()
		return false
	}
	d := c.db
	d.inUse--
	b.inUse--
	d.lastUsed = now
	reason, w := b.checkinReasonLocked(c, now)

	used := now.Sub(c.checkedOut)
	if reason != reasonNone {
		c.state.Store(stateDoomed)
		b.countEvictionLocked(d, reason)
		b.markClosingLocked(c.tok)
		if w != nil {
			c.tok.claim = w
			w.claim = c.tok
		}
		ws := d.workspace
		b.mu.Unlock()
		b.recordUse(c, used)
		if l := b.log.Load(); l != nil {
			l.LogAttrs(bg, slog.LevelDebug, "tenantpg: closing a returned connection",
				slog.String("workspace", ws), slog.String("reason", reasonNames[reason]))
		}
		return false
	}
	c.state.Store(stateIdle)
	c.idleSince = now
	d.idleConns.pushFront(c)
	d.idle++
	b.idle++
	b.touchLocked(d)
	// An armed reaper runs no later than this conn's idle expiry (it is
	// armed for the earliest expiry, and every earlier check-in expires
	// first), so only an earlier end of life needs arming. Skipping the
	// time arithmetic otherwise is a measurable part of a check-in.
	if !b.reaper.armed || b.lifetime > 0 && b.reaper.at.Sub(c.created) > b.lifetime {
		b.armReaperLocked(b.expiry(c), now)
	}
	if b.waiters.len > 0 {
		// A waiter may take this connection once its grace period ends,
		// unless database/sql reuses it first.
		b.armGraceLocked(now.Add(b.grace), now)
	}
	b.mu.Unlock()
	b.recordUse(c, used)
	return true
}

// recordUse records how long database/sql held a connection. A connection
// returned without ever being checked out has no use to record.
func (b *budget) recordUse(c *conn, d time.Duration) {
	if c.used && !c.checkedOut.IsZero() {
		b.metrics.Load().recordUse(d)
	}
}

func (b *budget) checkinReasonLocked(c *conn, now time.Time) (evictReason, *waiter) {
	d := c.db
	switch {
	case c.broken():
		return reasonBroken, nil
	case b.closed:
		return reasonDriverClosed, nil
	case b.lifetime > 0 && now.Sub(c.created) >= b.lifetime:
		return reasonLifetime, nil
	case b.overLimitLocked(d):
		return reasonBudgetShrink, nil
	}
	if b.waiters.len > 0 {
		if w := b.waiterForLocked(d, now); w != nil {
			return reasonHandoff, w
		}
	}
	return reasonNone, nil
}

// overLimitLocked reports whether d holds more live connections than its
// cap, or holds shared ones while the shared pool is over the budget: both
// after a limit was lowered.
func (b *budget) overLimitLocked(d *database) bool {
	live := d.open - d.closing
	return live > b.capOf(d) || live > d.reserved && b.sharedLive > b.limit-b.reserved
}

// waiterForLocked returns the first waiter that the token of a connection of
// d, once released, would serve, among those that have waited at least the
// grace period. A newer waiter is better served by evicting an idle
// connection of a less recently used database once its grace ends; a waiter
// older than that has met only connections that database/sql reuses faster
// than the grace period, and would starve without this hand-off.
func (b *budget) waiterForLocked(d *database, now time.Time) *waiter {
	frees := d.open-d.closing > d.reserved
	for w := b.waiters.front; w != nil; w = b.waiters.next(w) {
		if now.Sub(w.since) < b.handoffAfter {
			return nil // later waiters are younger still
		}
		if w.claim != nil {
			continue
		}
		if w.db == d || (frees && w.db.open < b.capOf(w.db)) {
			return w
		}
	}
	return nil
}

// checkout marks a fresh or idle conn busy. It reports false when the
// driver has closed the conn, and database/sql then retries on another one;
// redial reports that the conn was evicted before its first use and needs a
// new physical connection.
//
// now is the checkout time, for the use-time histogram and Stats.LongestUse.
func (b *budget) checkout(c *conn, now time.Time) (ok, redial bool) {
	b.mu.Lock()
	switch c.state.Load() {
	case stateBusy:
	case stateFresh:
		b.fresh.remove(c)
		c.state.Store(stateBusy)
		c.used = true
		c.checkedOut = now
		c.db.busy.pushBack(c)
	case stateRedial:
		b.mu.Unlock()
		return false, true
	case stateIdle:
		b.unlinkIdleLocked(c)
		b.reusedLocked(c.db)
		c.state.Store(stateBusy)
		c.used = true
		c.checkedOut = now
		c.db.busy.pushBack(c)
		c.db.inUse++
		b.inUse++
	default:
		b.staleCheckouts++
		b.mu.Unlock()
		return false, false
	}
	b.mu.Unlock()
	return true, false
}

// beginIdleOp protects an operation database/sql runs on a connection in its
// free list (closing a prepared statement) from a concurrent eviction. It
// reports whether the operation may touch the connection and whether the
// connection was idle, which endIdleOp needs.
func (b *budget) beginIdleOp(c *conn) (ok, wasIdle bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch c.state.Load() {
	case stateIdle:
		c.inOp = true // stays idle, in place, but is not evicted meanwhile
		return true, true
	case stateBusy, stateDoomed, stateFresh:
		return true, false
	}
	return false, false
}

func (b *budget) endIdleOp(c *conn) {
	b.mu.Lock()
	c.inOp = false
	if c.state.Load() == stateIdle {
		switch {
		case c.broken():
			b.evictLocked(c, reasonBroken, nil)
		case b.closed:
			b.evictLocked(c, reasonDriverClosed, nil)
		case b.overLimitLocked(c.db):
			// A shrink skipped it while the statement was being closed.
			b.evictLocked(c, reasonBudgetShrink, nil)
		}
	}
	// Waiters may have looked for a victim while this one was in use.
	b.serveWaitersLocked()
	b.unlock()
}

// closeConn handles Close from database/sql (or a driver.Open user). It
// reports whether the caller must close the physical connection; a conn the
// driver evicted is being closed already.
func (b *budget) closeConn(c *conn) bool {
	b.mu.Lock()
	switch c.state.Load() {
	case stateClosed:
		b.mu.Unlock()
		return false
	case stateEvicted, stateRedial:
		// The driver closed it already.
		c.state.Store(stateClosed)
		c.db.refs--
		b.forgetLocked(c.db)
		b.unlock()
		return false
	case stateFresh:
		b.fresh.remove(c)
		c.db.inUse--
		b.inUse--
		b.markClosingLocked(c.tok)
	case stateIdle:
		b.unlinkIdleLocked(c)
		b.markClosingLocked(c.tok)
	case stateBusy:
		c.db.busy.remove(c)
		c.db.inUse--
		b.inUse--
		b.markClosingLocked(c.tok)
	case stateDoomed:
		// Counted as closing at check-in.
	}
	c.state.Store(stateClosed)
	b.endLocked(c.tok)
	c.db.refs--
	b.forgetLocked(c.db)
	b.unlock()
	return true
}

func (b *budget) expiry(c *conn) time.Time {
	at := c.idleSince.Add(b.idleTimeout)
	if b.lifetime > 0 {
		if l := c.created.Add(b.lifetime); l.Before(at) {
			at = l
		}
	}
	return at
}

// wakeup runs fn at the earliest time it has been armed for. It uses
// time.AfterFunc, so nothing runs while it is not armed. Guarded by
// budget.mu; fn must call fired under that lock before looking at the state.
type wakeup struct {
	fn    func()
	timer *time.Timer
	at    time.Time
	armed bool
}

func (w *wakeup) arm(at, now time.Time) {
	if w.armed && !at.Before(w.at) {
		return
	}
	w.at, w.armed = at, true
	if w.timer == nil {
		w.timer = time.AfterFunc(at.Sub(now), w.fn)
	} else {
		w.timer.Reset(at.Sub(now))
	}
}

func (w *wakeup) fired() { w.armed = false }

func (w *wakeup) stop() {
	if w.timer != nil {
		w.timer.Stop()
	}
	w.armed = false
}

func (b *budget) armReaperLocked(at, now time.Time) {
	if !b.closed {
		b.reaper.arm(at, now)
	}
}

// reap closes idle connections past their idle timeout or lifetime. It runs
// on a timer armed for the earliest expiry, so an idle driver costs no
// goroutine.
func (b *budget) reap() {
	now := time.Now()
	b.mu.Lock()
	b.reaper.fired()
	var next time.Time
	for _, l := range b.recency() {
		for x := l.back; x != nil; {
			prevDB := l.prev(x)
			for c := x.idleConns.back; c != nil; {
				prevConn := x.idleConns.prev(c)
				at := b.expiry(c)
				if c.inOp && !at.After(now) {
					at = now.Add(b.grace) // a statement is being closed on it: look again soon
				}
				if !at.After(now) {
					reason := reasonIdleTimeout
					if b.lifetime > 0 && now.Sub(c.created) >= b.lifetime {
						reason = reasonLifetime
					}
					b.evictLocked(c, reason, nil)
				} else if next.IsZero() || at.Before(next) {
					next = at
				}
				c = prevConn
			}
			x = prevDB
		}
	}
	for c := b.fresh.front; c != nil; {
		nextConn := b.fresh.next(c)
		if at := c.created.Add(b.idleTimeout); !at.After(now) {
			b.evictLocked(c, reasonIdleTimeout, nil)
		} else {
			if next.IsZero() || at.Before(next) {
				next = at
			}
			break
		}
		c = nextConn
	}
	if !next.IsZero() {
		b.armReaperLocked(next, now)
	}
	b.unlock()
}

func (b *budget) armGraceLocked(at, now time.Time) {
	if !b.closed {
		b.graceEnded.arm(at, now)
	}
}

func (b *budget) graceExpired() {
	b.mu.Lock()
	b.graceEnded.fired()
	b.serveWaitersLocked()
	b.unlock()
}

// reconfigure applies new settings. Lowering the budget or a cap closes idle
// connections down to the new limits at once; busy ones are closed when they
// are checked in. Raising it serves waiters.
func (b *budget) reconfigure(cfg Config) error {
	b.mu.Lock()
	if cfg.MaxConnections < b.reserved {
		b.mu.Unlock()
		return &ConfigError{Field: "MaxConnections", Reason: errReservedExceedsBudget(cfg.MaxConnections, b.reserved)}
	}
	b.apply(cfg)
	now := time.Now()
	b.shrinkLocked()
	b.serveWaitersLocked()
	// The timeouts may have changed. Disarm even with nothing idle: a later
	// check-in skips arming a reaper armed early enough, and the old time
	// may be later than the new idle timeout allows.
	b.reaper.stop()
	if b.idle > 0 || b.fresh.len > 0 {
		b.armReaperLocked(now, now) // rescan now
	}
	b.unlock()
	return nil
}

// shrinkLocked evicts idle connections until every database is within its
// cap and the shared pool within the budget, counting connections already
// closing as gone.
func (b *budget) shrinkLocked() {
	for _, l := range b.recency() {
		for x := l.back; x != nil; {
			prev := l.prev(x)
			for x.open-x.closing > b.capOf(x) {
				v := b.oldestIdleLocked(x)
				if v == nil {
					break
				}
				b.evictLocked(v, reasonBudgetShrink, nil)
			}
			x = prev
		}
	}
	for v := b.fresh.front; v != nil; {
		next := b.fresh.next(v)
		if v.db.open-v.db.closing > b.capOf(v.db) {
			b.evictLocked(v, reasonBudgetShrink, nil)
		}
		v = next
	}
	for b.sharedLive > b.limit-b.reserved {
		var v *conn
		for _, l := range b.recency() {
			for x := l.back; x != nil && v == nil; x = l.prev(x) {
				if x.open-x.closing > x.reserved {
					v = b.oldestIdleLocked(x)
				}
			}
		}
		for f := b.fresh.front; f != nil && v == nil; f = b.fresh.next(f) {
			if f.db.open-f.db.closing > f.db.reserved {
				v = f
			}
		}
		if v == nil {
			return
		}
		b.evictLocked(v, reasonBudgetShrink, nil)
	}
}

// close fails every waiter, closes every idle connection and stops the
// timers. Busy connections are closed when database/sql returns them.
func (b *budget) close() {
	b.mu.Lock()
	if b.closed {
		b.waitDrainsLocked()
		b.mu.Unlock()
		return
	}
	b.closed = true
	for w := b.waiters.front; w != nil; {
		next := b.waiters.next(w)
		b.waiters.remove(w)
		w.db.waiting--
		w.granted, w.err = true, errDriverClosed
		if w.claim != nil {
			w.claim.claim = nil
			w.claim = nil
		}
		close(w.ready)
		w = next
	}
	for _, l := range b.recency() {
		for x := l.back; x != nil; {
			prev := l.prev(x)
			for v := x.idleConns.back; v != nil; {
				p := x.idleConns.prev(v)
				if !v.inOp { // endIdleOp closes the others
					b.evictLocked(v, reasonDriverClosed, nil)
				}
				v = p
			}
			x = prev
		}
	}
	for b.fresh.front != nil {
		b.evictLocked(b.fresh.front, reasonDriverClosed, nil)
	}
	b.reaper.stop()
	b.graceEnded.stop()
	b.unlock()
	// Never under mu: a collection holds the SDK's pipeline lock while its
	// callback takes mu, and Unregister takes that pipeline lock.
	b.metrics.Load().close()
	b.mu.Lock()
	b.waitDrainsLocked()
	b.mu.Unlock()
}

// waitDrainsLocked waits until no socket is being drained. Each drain ends
// within drainTimeout.
func (b *budget) waitDrainsLocked() {
	for b.draining > 0 || b.jobs > 0 {
		b.drained.Wait()
	}
}
