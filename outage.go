package tenantpg

import (
	"log/slog"
	"time"
)

// serverDownErrorLocked is the error of a caller of d whose wait ends while
// d's server is down.
func (b *budget) serverDownErrorLocked(d *backendPool, now time.Time, waited time.Duration, cause, callerErr error) *ServerDownError {
	s := d.srv
	s.failed++
	return &ServerDownError{Workspace: d.workspace, Database: d.name, Server: s.label,
		Down: now.Sub(s.since), Waited: waited, Waiting: s.waiting, Err: cause, ctxErr: callerErr}
}

func (b *budget) logServerDown(srv, workspace string, cause error) {
	if l := b.log.Load(); l != nil {
		attrs := []slog.Attr{slog.String("server", srv), slog.String("workspace", workspace)}
		if cause != nil {
			attrs = append(attrs, slog.String("error", cause.Error()))
		}
		l.LogAttrs(bg, slog.LevelWarn, "tenantpg: server down: callers wait while one probe at a time dials it", attrs...)
	}
}

func (b *budget) logServerUp(srv string, downFor time.Duration) {
	if l := b.log.Load(); l != nil {
		l.LogAttrs(bg, slog.LevelInfo, "tenantpg: server up", slog.String("server", srv), slog.Duration("downFor", downFor))
	}
}

// hungDialAfterLocked is how long a dial to s may run before s counts as
// not answering.
func (b *budget) hungDialAfterLocked(s *server) time.Duration {
	d := b.hungDialAfter
	if s != nil {
		d = max(d, 10*s.dialTime.duration())
	}
	return d
}

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
