package tenantpg

import (
	"sync/atomic"
	"time"
)

// tokens is the budget of one server (host and port, as the DSN resolves
// them): each server has its own max_connections, so a token of one cannot
// pay for a backend of another, and eviction, the queue of callers that are
// to dial, reservations and dial pacing all work per server. Guarded by
// budget.mu.
type tokens struct {
	// max is its budget as configured: Config.MaxConnections or its
	// ServerMaxConnections figure. limit is what it may hold now: max, or
	// with a fleet budget the slots its coordinator leased (held), within
	// max less the coordination session, and lowered while it yields
	// slots to other processes (fleetCap until fleetCapUntil).
	max, limit int
	fleet      *fleetCoordinator // nil without a fleet budget
	fleetRole  string            // the role whose fleet it is part of
	held       int
	granted    bool // the coordinator has set held at least once: held is a share, not a fallback
	fleetCap   int
	capUntil   time.Time
	fleetFloor int // what it may hold whatever its leases (fleetFloor)

	reserved    int // Σ database.reserved
	sharedInUse int // tokens held beyond reservations
	sharedLive  int // Σ max(0, db.open - db.closing - db.reserved)
	open        int // tokens held: dialing, in use, idle or closing
	dialing     int
	inUse       int
	idle        int
	closing     int // tokens whose backend is being torn down
	peakOpen    int

	queue   list[waiter, waiterInBudgetQueue] // callers that need a token, oldest first
	waiting int                               // callers queued on its databases (Σ database.waiters.len)
	recency slru                              // databases with idle backends

	// Dial pacing (pace.go). claims counts the waiters promised the token
	// of a backend being closed for them: each is about to dial and holds
	// a dial slot.
	claims int
	pace   pacer
}

// serverKey names a server as the DSN resolves it.
type serverKey struct {
	host string
	port uint16
}

// server is one server's budget (tokens) and circuit.
type server struct {
	key   serverKey
	label string // host:port, for stats, metrics and errors

	tokens // guarded by budget.mu

	// metricOpts are its metric attribute sets, built by the first
	// collection that sees it; not guarded by budget.mu.
	metricOpts atomic.Pointer[serverMetricOpts]

	// Guarded by budget.mu.
	refs     int       // databases on this server
	down     bool      // a dial found it unreachable, not accepting connections or not answering
	since    time.Time // when it went down
	lastErr  error     // what the last failed dial found, without its DSN details
	probing  bool      // a probe is under way: prober seeks a token, or its dial runs
	prober   *waiter   // the waiter that is to dial the probe, while it seeks a token
	failures int       // probes failed since it went down
	probeAt  time.Time // no probe starts before
	wake     wakeup    // starts the next probe
	outages  uint64    // times it went down
	failed   uint64    // callers whose wait ended while it was down
	// dialTime is the EWMA of its successful dials' duration: how long it
	// takes to answer when it is up.
	dialTime ewma
	answered time.Time // when a dial last got an answer from it
}

// dialSlotFreeLocked reports whether another caller may start a dial to s,
// or an eviction for one.
func (s *tokens) dialSlotFreeLocked() bool {
	return s.dialing+s.claims < min(s.pace.slots, s.limit)
}
