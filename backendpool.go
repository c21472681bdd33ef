package tenantpg

import (
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/stdlib"
)

// down reports whether d's server is down: its callers wait for the probe
// instead of dialing.
func (d *backendPool) serverDown() bool { return d.srv != nil && d.srv.down }

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
