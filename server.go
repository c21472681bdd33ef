package tenantpg

import (
	"net"
	"strconv"
	"sync/atomic"
	"time"
)

// serverKey names a server as the DSN resolves it.
type serverKey struct {
	host string
	port uint16
}

// server is one PostgreSQL server (host and port, as the DSN resolves them,
// after Config.ServerAliases) and what the driver keeps of it. Each server
// has its own max_connections, so a token of one cannot pay for a backend
// of another, and eviction, the dial queue, reservations, dial pacing, the
// circuit and a fleet lease all work per server. Its fields are components,
// each in its own file; the transitions that change several of them are
// the budget's (checkout.go, checkin.go, token.go, outage.go, limits.go).
// Guarded by budget.mu; never locks, never blocks, holds no *budget.
type server struct {
	key   serverKey
	label string // host:port, for stats, metrics and errors

	// metricOpts are its metric attribute sets, built by the first
	// collection that sees it; not guarded by budget.mu.
	metricOpts atomic.Pointer[serverMetricOpts]

	// pools are the pools on it. It is forgotten with the last, unless it
	// has a fleet lease (register.go).
	pools   list[backendPool, poolOnServer]
	ledger  ledger    // its tokens (ledger.go)
	queue   dialQueue // callers that are to dial, oldest first (waiter.go)
	waiting int       // callers queued on its pools (Σ pool waiters.len)
	recency slru      // its pools with idle backends, in eviction order (lru.go)
	pace    pacer     // how many dials may run at once (pace.go)
	circuit circuit   // whether it is down, and its probes (circuit.go)
	lease   fleetLease
	// dialTime is the EWMA of its successful dials' duration: how long it
	// takes to answer when it is up.
	dialTime ewma
	answered time.Time // when a dial last got an answer from it
}

// newServer returns the server of key, with the budget budgetOf gives its label.
func newServer(key serverKey, budgetOf func(label string) int) *server {
	s := &server{key: key, label: net.JoinHostPort(key.host, strconv.Itoa(int(key.port)))}
	s.ledger.max = budgetOf(s.label)
	s.ledger.limit = s.ledger.max
	s.pace.slots = initialDialSlots
	return s
}

// dialSlotFree reports whether another caller may start a dial to s, or an
// eviction for one: the dials under way and the claims are within the
// pacing's slots.
func (s *server) dialSlotFree() bool {
	return s.ledger.dialing+s.queue.claims < min(s.pace.slots, s.ledger.limit)
}

type poolOnServer struct{}

func (poolOnServer) links(p *backendPool) *links[backendPool] { return &p.onServer }
