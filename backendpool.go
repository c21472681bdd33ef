package tenantpg

import (
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/stdlib"
)

// A pool's backends: the state of one connector (a *sql.DB, a Pool, or one
// workspace of a routed DB), the backends it dialed and the callers queued
// for one.

// backendPool is one pool: the backends one connector dialed with its own
// DSN, which serve only that connector's handles. Two *sql.DBs opened with
// the same DSN are two pools, as with pgx's stdlib driver; pools share their
// server's tokens, recency order, dial queue, dial pacing, circuit and
// fleet lease, never a session. Its fields under budget.mu are changed by
// the budget's transitions; it never locks, never blocks, and holds no
// *budget.
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
	srv         *server // its server; nil once forgotten
	onServer    links[backendPool]
	workspace   string
	capOverride int // pool_max_conns; 0 = the driver's per-database default
	refs        int // its connector, handles and waiters
	// closed: its connector was closed. Its idle backends were closed
	// then, and a backend checked in later is closed, so that no session
	// of a closed pool (temporary tables, SET, advisory locks, LISTEN)
	// reaches later code.
	closed bool

	// What a victim choice reads of every pool it passes (lru.go), kept
	// together so that it touches few cache lines per pool. With them
	// apart, the eviction decision at 100,000 pools measured 7% slower in
	// one comparison and 6% (p=0.09) in another (BENCHMARKS.md, #21).
	tokens tokenCounts        // its tokens, in its server's ledger
	lru    links[backendPool] // in its server's recency lists while it has idle backends
	// spare: in the recency's spare lists, while listed and holding two
	// live backends or more (lru.go).
	spare links[backendPool]
	// idleBackends are most recently checked in first; a checkout takes
	// the front, so backends the load no longer needs age at the back.
	idleBackends list[backend, backendInList]
	// protected: one of its backends was reused since it last had none.
	// Cleared when it holds no backend or is demoted.
	protected bool

	lastUsed  time.Time
	evictions uint64
	waiters   poolQueue // callers waiting for a backend, oldest first
	// busy holds the checked-out backends, oldest checkout first, so that
	// Stats can name one held for minutes (a leaked *sql.Conn, Rows or Tx)
	// without a scan.
	busy   list[backend, backendInList]
	growth growth // whether its callers should wait or dial (growth.go)
}

// room reports whether p may take a token of its server now, without a
// backend closing for it.
func (p *backendPool) room() bool { return p.srv.ledger.room(&p.tokens) }

// serverDown reports whether p's server is down: its callers wait for the
// probe instead of dialing.
func (p *backendPool) serverDown() bool { return p.srv != nil && p.srv.circuit.down }

type backendState uint8

const (
	backendDialing backendState = iota // not known to the budget yet
	backendBusy                        // checked out by a handle
	backendIdle                        // in its pool's idle list; may be evicted
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
	// watch links it into the leak watch (reclaim.go) while it is checked
	// out and not yet reported as a suspected leak; leaked marks one
	// reported.
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

// Weights of the moving averages: a pool's use time follows its load
// within a few dozen checkouts; a dial time, measured less often, within
// a handful of dials.
const (
	useTimeAlpha  = 1.0 / 16
	dialTimeAlpha = 1.0 / 8
)
