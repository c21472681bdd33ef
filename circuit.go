package tenantpg

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// The circuit: one per server (host and port, as the DSN resolves them).
//
// Without it, every caller that needs a backend while the server is
// restarting dials, is refused, and fails at once, and callers that retry
// hammer the server the moment it listens again. With it, the first dial
// that finds the server unreachable or not accepting connections marks it
// down. While it is down the callers of its databases wait in their queues,
// bounded by their context and the acquire timeout as for any wait, and do
// not dial; one of them at a time dials as a probe, after a backoff that
// doubles from probeBackoffMin to probeBackoffMax, with jitter. The probe's
// success marks the server up: its backend serves the caller that dialed
// it, and the others go back to the wait-or-dial decision of their
// database.
//
// A dial that has run for longer than a healthy server takes to answer
// (hungDialAfterLocked) marks the server down too, unless the server
// answered another dial meanwhile (a server slowed down by load is not
// hung): a host that accepts TCP and never answers would otherwise collect
// a dial, and a token, from every caller until their deadlines. That dial
// is then the probe.

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

// Probe backoff: the first probe follows the failure that marked the
// server down by about probeBackoffMin, later ones double up to
// probeBackoffMax. A restart takes from a fraction of a second to a few
// seconds; a caller waits at most about probeBackoffMax beyond the moment
// the server accepts connections again.
const (
	probeBackoffMin = 50 * time.Millisecond
	probeBackoffMax = time.Second
)

// probeBackoff is the pause before the probe that follows failures failed
// probes: between half and all of the doubled delay, so that drivers in
// several processes do not probe in step.
func probeBackoff(failures int) time.Duration {
	d := probeBackoffMin << min(failures, 8)
	if d > probeBackoffMax {
		d = probeBackoffMax
	}
	return d/2 + time.Duration(rand.Int64N(int64(d/2)+1))
}

// defaultHungDialAfter is how long a dial may run, at least, before the
// server counts as not answering: a PostgreSQL that is up answers a
// start-up within milliseconds on a local network and within about 100ms
// with TLS across a region. A server whose dials are slow when it is up
// gets ten times its average (hungDialAfterLocked).
const defaultHungDialAfter = 250 * time.Millisecond

// hungDialAfterLocked is how long a dial to s may run before s counts as
// not answering.
func (b *budget) hungDialAfterLocked(s *server) time.Duration {
	d := b.hungDialAfter
	if s != nil {
		d = max(d, 10*s.dialTime.duration())
	}
	return d
}

// errNotAnswering is what a server that accepted a connection and did not
// answer is down for.
var errNotAnswering = errors.New("the server accepted the connection and did not answer")

// serverLocked returns the circuit of key, made on first use.
// serverKeyLocked returns the server a DSN's host and port count against:
// the one Config.ServerAliases names for it, or itself.
func (b *budget) serverKeyLocked(k serverKey) serverKey {
	if len(b.aliases) == 0 {
		return k
	}
	to, ok := b.aliases[net.JoinHostPort(k.host, strconv.Itoa(int(k.port)))]
	if !ok {
		return k
	}
	host, port, _ := net.SplitHostPort(to) // checked by Config.normalize
	p, _ := strconv.ParseUint(port, 10, 16)
	return serverKey{host: host, port: uint16(p)}
}

func (b *budget) serverLocked(key serverKey) *server {
	s := b.servers[key]
	if s == nil {
		s = &server{key: key, label: net.JoinHostPort(key.host, strconv.Itoa(int(key.port)))}
		s.max = b.serverLimitLocked(s.label)
		s.limit = s.max
		s.pace.slots = initialDialSlots
		s.wake.fn = func() { b.probeDue(s) }
		b.servers[key] = s
	}
	s.refs++
	return s
}

// releaseServerLocked drops d's reference to its server, and the server's
// state once no database uses it.
func (b *budget) releaseServerLocked(d *backendPool) {
	s := d.srv
	if s == nil {
		return
	}
	d.srv = nil
	s.refs--
	// A server with a fleet budget is kept: its coordination session and
	// leases outlive its databases until the driver closes.
	if s.refs == 0 && b.servers[s.key] == s && s.fleet == nil {
		s.wake.stop()
		delete(b.servers, s.key)
	}
}

// down reports whether d's server is down: its callers wait for the probe
// instead of dialing.
func (d *backendPool) serverDown() bool { return d.srv != nil && d.srv.down }

// markDownLocked records that a dial found s down. The callers that were to
// dial go back to waiting in their database's queue, and the first probe is
// scheduled.
func (b *budget) markDownLocked(s *server, now time.Time, cause error) {
	s.lastErr = cause
	if s.down {
		return
	}
	s.down, s.since, s.failures = true, now, 0
	s.outages++
	for w := s.queue.front; w != nil; {
		next := s.queue.next(w)
		b.unseekLocked(w)
		w = next
	}
	s.probeAt = now.Add(probeBackoff(0))
	b.armProbeLocked(s, now)
}

// markUpLocked records that s answered: every database of s with callers
// waiting goes back to the wait-or-dial decision.
func (b *budget) markUpLocked(s *server, now time.Time) (downFor time.Duration) {
	if !s.down {
		return 0
	}
	downFor = now.Sub(s.since)
	s.down, s.probing, s.failures = false, false, 0
	if s.prober != nil {
		// Still seeking a token: it stays in the budget's queue as any
		// caller that is to dial.
		s.prober = nil
	}
	s.wake.stop()
	for d := range b.dbs {
		if d.srv == s && d.waiters.len > 0 {
			b.growLocked(d)
		}
	}
	return downFor
}

// probeEndedLocked records the end of s's probe. failed: the server did not
// answer it, and the next one waits longer; otherwise (its caller gave up
// first) the next one may start at once.
func (b *budget) probeEndedLocked(s *server, now time.Time, failed bool) {
	s.probing = false
	if !s.down {
		return
	}
	if failed {
		s.failures++
		s.probeAt = now.Add(probeBackoff(s.failures))
	}
	b.armProbeLocked(s, now)
}

// armProbeLocked arms s's timer for its next probe. The probe itself starts
// on the timer even when it is due now, so that it never runs inside a walk
// of the queues that made it due.
func (b *budget) armProbeLocked(s *server, now time.Time) {
	if b.closed || !s.down || s.probing {
		return
	}
	at := s.probeAt
	if at.Before(now) {
		at = now
	}
	s.wake.arm(b.clock, at, now)
}

// startProbeLocked lets the oldest caller waiting on down server s dial, if
// no probe is under way and its backoff has passed. It returns whether one
// started.
func (b *budget) startProbeLocked(s *server, now time.Time) bool {
	if !s.down || s.probing || b.closed {
		return false
	}
	if now.Before(s.probeAt) {
		b.armProbeLocked(s, now)
		return false
	}
	var oldest *waiter
	for d := range b.dbs {
		if d.srv != s || d.waiters.len == 0 {
			continue
		}
		w := d.waiters.front
		if d.open-d.closing+d.seeking >= b.capLocked(d) {
			continue // at its cap: it waits for a backend of its own
		}
		if oldest == nil || w.since.Before(oldest.since) {
			oldest = w
		}
	}
	if oldest == nil {
		return false // the next caller to queue starts it
	}
	s.probing, s.prober = true, oldest
	b.seekLocked(oldest)
	return true
}

// classifyDialError sorts a failed dial: refused for lack of slots (the
// driver retries), the server unreachable or not accepting connections
// (its circuit opens), or anything else, which the server answered or the
// caller's context ended.
func classifyDialError(err error) dialErrorKind {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case "53300":
			return dialRejected
		case "57P01", "57P02", "57P03", "08006":
			// admin_shutdown and crash_shutdown at login, cannot_connect_now
			// (shutting down, starting up, in recovery), connection_failure.
			return dialDown
		}
		return dialOther
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return dialOther // the caller's context, not the server: the connector judges its duration
	}
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return dialOther // a name that does not resolve is a configuration error, not an outage
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return dialOther
	}
	var opErr *net.OpError
	switch {
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.ECONNABORTED),
		errors.Is(err, syscall.EPIPE), errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		// Nothing listening, or the connection cut during start-up
		// (authentication included): the server is going down or coming up.
		return dialDown
	case errors.As(err, &opErr):
		return dialDown
	}
	return dialOther
}

// isContextError reports whether err ended because a context ended.
func isContextError(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// downCause is what a failed dial says about its server, without pgx's
// description of the dial (which names another caller's user and
// database): the server's error, or the network error.
func downCause(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr
	}
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Err != nil {
		return opErr.Err
	}
	switch {
	case errors.Is(err, io.ErrUnexpectedEOF):
		return io.ErrUnexpectedEOF
	case errors.Is(err, io.EOF):
		return io.EOF
	case isContextError(err):
		return errNotAnswering
	}
	return errors.New("connection failed")
}
