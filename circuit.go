package tenantpg

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
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
//
// The circuit below is the state and its backoff; what a server going down
// or up does to its callers is in outage.go.

// circuit is one server's circuit breaker. Guarded by budget.mu; never
// locks, never blocks, holds no *budget (its timer's callback is the
// budget's probeDue).
type circuit struct {
	down     bool      // a dial found it unreachable, not accepting connections or not answering
	since    time.Time // when it went down
	lastErr  error     // what the last failed dial found, without its DSN details
	probing  bool      // a probe is under way: prober seeks a token, or its dial runs
	prober   *waiter   // the waiter that is to dial the probe, while it seeks a token
	probeTok *token    // the probe's token, while its dial runs: the one dial whose end is the probe's
	failures int       // probes failed since it went down
	probeAt  time.Time // no probe starts before
	wake     wakeup    // starts the next probe
	outages  uint64    // times it went down
	failed   uint64    // callers whose wait ended while it was down
}

// trip records that a dial found the server down for cause. It reports
// whether the server was up until now; the first probe is then due after
// probeBackoff(0).
func (c *circuit) trip(now time.Time, cause error) bool {
	c.lastErr = cause
	if c.down {
		return false
	}
	c.down, c.since, c.failures = true, now, 0
	c.outages++
	c.probeAt = now.Add(probeBackoff(0))
	return true
}

// reset records that the server answered. It reports whether it was down,
// and for how long. A prober still seeking a token stays in the dial queue
// as any caller that is to dial.
func (c *circuit) reset(now time.Time) (wasDown bool, downFor time.Duration) {
	if !c.down {
		return false, 0
	}
	downFor = now.Sub(c.since)
	c.down, c.probing, c.failures = false, false, 0
	c.prober = nil
	// A probe's dial still running is an ordinary dial from now on: if it
	// fails in a later outage, that outage's probe is another.
	c.endProbeTok()
	c.wake.stop()
	return true, downFor
}

// probeEnded records the end of the probe. failed: the server did not
// answer it, and the next one waits longer; otherwise (its caller gave up
// first) the next one may start at once.
func (c *circuit) probeEnded(now time.Time, failed bool) {
	c.probing = false
	c.endProbeTok()
	if c.down && failed {
		c.failures++
		c.probeAt = now.Add(probeBackoff(c.failures))
	}
}

// startProbeTok records that t's dial is the probe.
func (c *circuit) startProbeTok(t *token) { c.probeTok = t }

// endProbeTok records that no dial is the probe any more.
func (c *circuit) endProbeTok() { c.probeTok = nil }

// isProbe reports whether t's dial is the probe of the current outage: a
// probe's dial outlived by a reset is an ordinary dial from then on.
func (c *circuit) isProbe(t *token) bool { return t != nil && c.probeTok == t }

// probeDue reports whether a probe may start at now: the server is down,
// none is under way, and the backoff has passed.
func (c *circuit) probeDue(now time.Time) bool {
	return c.down && !c.probing && !now.Before(c.probeAt)
}

// armProbe arms the timer for the next probe, if one is to start. The
// probe starts on the timer even when it is due now, so that it never runs
// inside a walk of the queues that made it due.
func (c *circuit) armProbe(clk clock, now time.Time) {
	if !c.down || c.probing {
		return
	}
	at := c.probeAt
	if at.Before(now) {
		at = now
	}
	c.wake.arm(clk, at, now)
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

// errNotAnswering is what a server that accepted a connection and did not
// answer is down for.
var errNotAnswering = errors.New("the server accepted the connection and did not answer")

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
