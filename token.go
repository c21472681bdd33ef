package tenantpg

import "time"

// A token's life, from its grant to its return: the transitions that
// count it in its server's ledger (ledger.go) and act on what its dial
// found.
//
// A token is taken when a caller is granted one to dial (takeLocked, from
// grantLocked in checkout.go). The dial succeeds (dialedLocked: its backend
// goes to the caller that dialed it) or fails (dialFailedLocked, which also
// tells the circuit what the dial found). Either way its owner is done with
// it at some point (endLocked: the dial failed, or the backend was closed,
// checkin.go), and the token returns (releaseLocked) once every socket
// dialed for it has drained: to the waiter it was promised to, or to the
// first in line.

// token tracks one backend's claim on the budget from the start of its dial
// until the server has closed every socket dialed for it. Guarded by
// budget.mu.
type token struct {
	db        *backendPool
	sock      *trackedConn // the last socket dialed for it: the backend's own
	sockets   int          // sockets dialed for this token and not yet drained
	ended     bool         // the owner is done: the dial failed or the backend closed
	released  bool
	claim     *waiter       // the waiter that gets this token when it is released
	gone      chan struct{} // made on demand; closed when the token is released
	dialDone  bool          // its dial has ended, or was never started
	dialStart time.Time     // when its dial started
	paceEpoch uint64        // the pacer's epoch when it was granted
}

type dialErrorKind uint8

const (
	dialRejected dialErrorKind = iota // the server refused: too many connections (SQLSTATE 53300)
	dialOther
	dialDown // the server unreachable, not accepting connections or not answering: its circuit opens
	numDialErrorKinds
)

// takeLocked counts a new token of p, for a dial.
func (b *budget) takeLocked(p *backendPool) {
	s := p.srv
	s.ledger.take(&p.tokens)
	s.recency.took(p)
	b.open++
	b.peakOpen = max(b.peakOpen, b.open)
}

// giveLocked counts a token of p back, from a backend that was dialing (a
// grant never used) or closing.
func (b *budget) giveLocked(p *backendPool, from backendState) {
	s := p.srv
	s.ledger.give(&p.tokens, from)
	s.recency.gave(p)
	b.open--
	if s.lease.coord != nil {
		if s.ledger.open < s.lease.held {
			s.lease.coord.poke() // a leased slot is spare: another process may need it
		}
		if b.closed && s.ledger.open == 0 {
			b.drained.Broadcast() // close waits for this before it unlocks the slots
		}
	}
}

// closingLocked counts t as closing: its backend, which was in state from,
// is being closed, or its dial failed.
func (b *budget) closingLocked(t *token, from backendState) {
	p := t.db
	p.srv.ledger.close(&p.tokens, from)
	p.srv.recency.liveDropped(p)
}

// dialedLocked records a successful dial of t that took took: be, its
// backend, is checked out by the caller that dialed it. It reports false
// when the driver was closed meanwhile, and be is closed.
func (b *budget) dialedLocked(t *token, be *backend, took time.Duration) bool {
	p := t.db
	s := p.srv
	s.ledger.dialed(&p.tokens)
	b.dialTime.add(took, dialTimeAlpha)
	now := b.clock.Now()
	be.db, be.tok, be.created = p, t, now
	s.pace.dialed(t.paceEpoch, took, s.ledger.limit, now)
	t.dialDone = true
	b.checkoutLocked(be, now, be.stack)
	if b.closed {
		b.closeBusyLocked(be, reasonDriverClosed, nil)
		return false
	}
	b.serveQueueLocked(s) // a dial slot freed
	s.dialTime.add(took, dialTimeAlpha)
	s.answered = now
	b.markUpLocked(s, now)
	return true
}

// dialFailedLocked records a failed dial of t; the token returns once any
// socket the dial opened has been drained.
func (b *budget) dialFailedLocked(t *token, kind dialErrorKind, cause error) {
	p := t.db
	// Its server, read now: a token ended here may be the last thing that
	// kept p's state (a Pool closed during the dial), which forgets it.
	s := p.srv
	t.dialDone = true
	if kind != dialRejected { // rejections are counted as they happen, retries included
		b.counters.dialErrors[kind]++
	}
	b.closingLocked(t, backendDialing)
	now := b.clock.Now()
	probe := s.circuit.isProbe(t)
	switch {
	case kind == dialDown && isContextError(cause) && s.answered.After(t.dialStart):
		// Cut short by its deadline while the server answered other
		// dials: slow, not down.
		if probe {
			b.probeEndedLocked(s, now, false)
		}
	case kind == dialDown:
		b.markDownLocked(s, now, downCause(cause), p.workspace)
		if probe {
			b.probeEndedLocked(s, now, true)
		}
	case isContextError(cause):
		// The caller gave up before the server said anything.
		if probe {
			b.probeEndedLocked(s, now, false)
		}
	default:
		// The server answered, if only to refuse this dial.
		s.answered = now
		if probe {
			s.circuit.probing = false
			s.circuit.endProbeTok()
		}
		b.markUpLocked(s, now)
	}
	// The token returns once every socket dialed for it has drained: now,
	// if none was opened (a refused dial), and then only after the circuit
	// has seen what this dial found, or the next caller in line would dial
	// a server found down.
	b.endLocked(t)
	// A dial slot freed.
	b.serveQueueLocked(s)
	// Callers queued behind this dial may have no backend coming now.
	b.growLocked(p)
	e := event{kind: evDialFailed, workspace: p.workspace, err: cause}
	if kind == dialRejected {
		e.kind = evRejected
	}
	b.eventLocked(e)
}

// endLocked records that the owner of t is done with it; the token returns
// once every socket dialed for it has been drained.
func (b *budget) endLocked(t *token) {
	t.ended = true
	if t.sockets == 0 {
		b.releaseLocked(t)
	}
}

// socketDrainedLocked counts a socket dialed for t whose drain ended.
func (b *budget) socketDrainedLocked(t *token) {
	b.draining--
	if b.draining == 0 && b.jobs == 0 {
		b.drained.Broadcast()
	}
	t.sockets--
	if t.ended && t.sockets == 0 {
		b.releaseLocked(t)
	}
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
	p := t.db
	s := p.srv
	b.giveLocked(p, backendClosing)
	if w := t.claim; w != nil {
		s.queue.dropClaim(w)
		if !w.done && w.db.tokens.live() < b.capLocked(w.db) && w.db.room() {
			b.grantLocked(w, b.clock.Now())
		}
	}
	b.serveQueueLocked(s)
	b.growLocked(p)
	b.forgetLocked(p)
}
