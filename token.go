package tenantpg

import "time"

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
	probe     bool          // its dial is its server's probe
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

// liveShared is d's part of sharedLive.
func liveShared(d *backendPool) int { return max(0, d.open-d.closing-d.reserved) }

func (b *budget) takeLocked(d *backendPool) {
	s := d.srv
	old := liveShared(d)
	if d.protected {
		s.recency.protectedOpen++
	}
	d.open++
	s.sharedLive += liveShared(d) - old
	s.open++
	if d.open > d.reserved {
		s.sharedInUse++
	}
	s.peakOpen = max(s.peakOpen, s.open)
	b.open++
	b.peakOpen = max(b.peakOpen, b.open)
}

func (b *budget) giveLocked(d *backendPool) {
	s := d.srv
	if d.open > d.reserved {
		s.sharedInUse--
	}
	old := liveShared(d)
	if d.protected {
		s.recency.protectedOpen--
		if d.open == 1 {
			d.protected = false // out of the cache: a new arrival starts on probation
		}
	}
	d.open--
	s.sharedLive += liveShared(d) - old
	s.open--
	b.open--
	s.recency.liveDroppedLocked(d)
	if s.fleet != nil {
		if s.open < s.held {
			s.fleet.poke() // a leased slot is spare: another process may need it
		}
		if b.closed && s.open == 0 {
			b.drained.Broadcast() // close waits for this before it unlocks the slots
		}
	}
}

func (b *budget) dialingLocked(d *backendPool) {
	d.dialing++
	d.srv.dialing++
	b.dials++
}

func (b *budget) markClosingLocked(t *token) {
	old := liveShared(t.db)
	t.db.closing++
	t.db.srv.sharedLive += liveShared(t.db) - old
	t.db.srv.closing++
	t.db.srv.recency.liveDroppedLocked(t.db)
}

// endLocked records that the owner of t is done with it; the token returns
// once every socket dialed for it has been drained.
func (b *budget) endLocked(t *token) {
	t.ended = true
	if t.sockets == 0 {
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
	d := t.db
	s := d.srv
	old := liveShared(d)
	d.closing--
	s.sharedLive += liveShared(d) - old
	s.closing--
	b.giveLocked(d)
	if w := t.claim; w != nil {
		b.dropClaimLocked(w)
		if !w.done && w.db.open-w.db.closing < b.capLocked(w.db) && b.roomLocked(w.db) {
			b.grantLocked(w, b.clock.Now())
		}
	}
	b.serveQueueLocked(s)
	b.growLocked(d)
	b.forgetLocked(d)
}
