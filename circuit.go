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
