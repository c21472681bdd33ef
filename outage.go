package tenantpg

import "time"

// A server going down and coming back: the transitions that act on what
// the circuit (circuit.go) records.
//
// A dial that finds the server down (dialFailedLocked, token.go) or runs
// past the time a healthy server takes to answer (dialHungLocked) trips the
// circuit: the callers that were to dial go back to waiting on their pools,
// and one probe at a time dials, after a backoff (startProbeLocked, on the
// circuit's timer). A dial that gets an answer resets it (markUpLocked):
// every pool with callers waiting goes back to the growth rule.

// hungDialAfterLocked is how long a dial to s may run before s counts as
// not answering.
func (b *budget) hungDialAfterLocked(s *server) time.Duration {
	d := b.hungDialAfter
	if s != nil {
		d = max(d, 10*s.dialTime.duration())
	}
	return d
}

// markDownLocked records that a dial of workspace found s down, for cause.
// The callers that were to dial go back to waiting on their pools, and the
// first probe is scheduled.
func (b *budget) markDownLocked(s *server, now time.Time, cause error, workspace string) {
	if !s.circuit.trip(now, cause) {
		return
	}
	for w := s.queue.front; w != nil; {
		next := s.queue.next(w)
		b.unseekLocked(w)
		w = next
	}
	b.armProbeLocked(s, now)
	b.eventLocked(event{kind: evServerDown, server: s.label, workspace: workspace, err: cause})
}

// markUpLocked records that s answered: every pool of s with callers
// waiting goes back to the growth rule.
func (b *budget) markUpLocked(s *server, now time.Time) {
	wasDown, downFor := s.circuit.reset(now)
	if !wasDown {
		return
	}
	for p := s.pools.front; p != nil; {
		next := s.pools.next(p)
		if p.waiters.len > 0 {
			b.growLocked(p)
		}
		p = next
	}
	if downFor > 0 {
		b.eventLocked(event{kind: evServerUp, server: s.label, held: downFor})
	}
}

// probeEndedLocked records the end of s's probe. failed: the server did not
// answer it, and the next one waits longer; otherwise (its caller gave up
// first) the next one may start at once.
func (b *budget) probeEndedLocked(s *server, now time.Time, failed bool) {
	s.circuit.probeEnded(now, failed)
	b.armProbeLocked(s, now)
}

// armProbeLocked arms s's timer for its next probe, if one is to start.
func (b *budget) armProbeLocked(s *server, now time.Time) {
	if !b.closed {
		s.circuit.armProbe(b.clock, now)
	}
}

// startProbeLocked lets the oldest caller waiting on down server s dial, if
// no probe is under way and its backoff has passed. It returns whether one
// started. The oldest caller that can get a token now probes first: one of
// a pool with no token free (the shared ones held, and its reservation, if
// any, in use) would hold the probe until a token comes, while another
// pool's caller could dial at once. A probe's caller that still waits for
// a token hands the probe over to such a caller.
func (b *budget) startProbeLocked(s *server, now time.Time) bool {
	if b.closed {
		return false
	}
	c := &s.circuit
	if w := c.prober; w != nil && w.claim == nil && !w.db.room() && b.probeCallerLocked(s, true) != nil {
		b.unseekLocked(w) // ends its probe: the next may start at once
	}
	if !c.probeDue(now) {
		b.armProbeLocked(s, now)
		return false
	}
	oldest := b.probeCallerLocked(s, true)
	if oldest == nil {
		// None can get a token now: the oldest evicts an idle backend,
		// or takes the next token freed.
		oldest = b.probeCallerLocked(s, false)
	}
	if oldest == nil {
		return false // the next caller to queue starts it
	}
	c.probing, c.prober = true, oldest
	b.seekLocked(oldest)
	return true
}

// probeCallerLocked returns the oldest first caller of a pool of s that may
// dial the probe: below its cap and, with room, with a token free.
func (b *budget) probeCallerLocked(s *server, room bool) *waiter {
	var oldest *waiter
	for p := s.pools.front; p != nil; p = s.pools.next(p) {
		if p.waiters.len == 0 {
			continue
		}
		if p.tokens.live()+p.waiters.seeking >= b.capLocked(p) {
			continue // at its cap: it waits for a backend of its own
		}
		if room && !p.room() {
			continue
		}
		if w := p.waiters.front; oldest == nil || w.since.Before(oldest.since) {
			oldest = w
		}
	}
	return oldest
}

// dialHungLocked marks t's server down because t's dial has run too long:
// the host accepted the connection (or the SYN is unanswered) and the
// server does not answer. The dial becomes the probe: no other caller dials
// until it ends.
func (b *budget) dialHungLocked(t *token) {
	s := t.db.srv
	if t.dialDone || s == nil || s.circuit.down || b.closed || s.answered.After(t.dialStart) {
		// Done, already known down, or the server answered another dial
		// since this one started: it is slow, not hung.
		return
	}
	b.markDownLocked(s, b.clock.Now(), errNotAnswering, t.db.workspace)
	s.circuit.wake.stop()
	s.circuit.probing = true
	s.circuit.startProbeTok(t)
}

// serverDownErrorLocked is the error of a caller of p whose wait ends while
// p's server is down.
func (b *budget) serverDownErrorLocked(p *backendPool, now time.Time, waited time.Duration, cause, callerErr error) *ServerDownError {
	s := p.srv
	s.circuit.failed++
	return &ServerDownError{Workspace: p.workspace, Database: p.name, Server: s.label,
		Down: now.Sub(s.circuit.since), Waited: waited, Waiting: s.waiting, Err: cause, ctxErr: callerErr}
}
