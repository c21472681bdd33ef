package tenantpg

import "time"

// A check-in, and every other close of a backend: the transitions from a
// caller giving a backend back to that backend serving another caller,
// going idle, or being closed.
//
// A backend checked in is closed when it must not be reused
// (checkinReasonLocked); closed for a caller of another pool that has
// waited too long for a token (starvingLocked: a hand-off across pools);
// handed to the first caller queued on its pool (handOverLocked,
// checkout.go); or else parked idle, where the eviction policy (lru.go) may
// later choose it for a caller that needs a token. A closed backend's token
// returns once the server has closed it (token.go).

type evictReason uint8

// Reasons the driver closes a backend.
const (
	reasonNone         evictReason = iota
	reasonLRU                      // idle, closed to give its token to another pool
	reasonHandoff                  // closed at check-in for a caller of another pool that waited too long
	reasonIdleTimeout              // idle for longer than ConnMaxIdleTime
	reasonLifetime                 // older than ConnMaxLifetime
	reasonBudgetShrink             // the budget or a pool's cap was lowered
	reasonBroken                   // found closed or broken, or returned mid-transaction
	reasonDriverClosed             // Driver.Close
	reasonServerFull               // idle, closed because the server refused a dial for lack of slots
	reasonUnused                   // idle, closed because the last *sql.DB and handle of its pool were closed
	reasonAbandoned                // busy, closed because its handle became garbage without being returned
	reasonFleet                    // closed to give its slot to another process of its fleet budget, or after the fleet's share shrank
	numReasons
)

var reasonNames = [numReasons]string{"", "lru", "handoff", "idle_timeout", "lifetime", "budget_shrink", "broken", "driver_closed", "server_full", "unused", "abandoned", "fleet"}

// defaultHandoffAfter bounds how long a caller that needs a token waits
// before it takes the token of the next backend any other pool checks in.
// Below it, hot pools pass their backends from caller to caller,
// which costs no dial; above it, a cold workspace is not starved by hot
// ones whose backends never go idle.
const defaultHandoffAfter = 100 * time.Millisecond

// checkinLocked takes back be at now. used is false for a backend a caller
// got and never used (its wait ended meanwhile).
func (b *budget) checkinLocked(be *backend, now time.Time, used bool) {
	p := be.db
	if used {
		p.growth.used(now.Sub(be.checkedOut))
		p.lastUsed = now
	}
	if reason := b.checkinReasonLocked(be, now); reason != reasonNone {
		b.closeBusyLocked(be, reason, nil)
		b.growLocked(p)
		return
	}
	if w := b.starvingLocked(p, now); w != nil {
		b.closeBusyLocked(be, reasonHandoff, w)
		b.growLocked(p)
		return
	}
	if w := p.waiters.front; w != nil {
		p.srv.recency.reused(p, p.srv.ledger.limit)
		b.handOverLocked(w, be, now)
		b.growLocked(p)
		b.serveQueueLocked(p.srv) // w may have held a dial slot
		return
	}
	s := p.srv
	p.busy.remove(be)
	b.watch.drop(be)
	s.ledger.park(&p.tokens)
	be.state = backendIdle
	be.idleSince = now
	p.idleBackends.pushFront(be)
	s.recency.touch(p)
	// An armed reaper runs no later than this backend's idle expiry (it is
	// armed for the earliest expiry, and every earlier check-in expires
	// first), so only an earlier end of life needs arming. Skipping the
	// time arithmetic otherwise is a measurable part of a check-in.
	if !b.reaper.armed || b.lifetime > 0 && b.reaper.at.Sub(be.created) > b.lifetime {
		b.armReaperLocked(b.expiryLocked(be), now)
	}
	b.serveQueueLocked(s)
}

// checkinReasonLocked returns why be, checked in at now, must be closed;
// reasonNone if it may be reused.
func (b *budget) checkinReasonLocked(be *backend, now time.Time) evictReason {
	switch {
	case b.io.broken(be) || be.resetFailed:
		return reasonBroken
	case b.closed:
		return reasonDriverClosed
	case b.lifetime > 0 && now.Sub(be.created) >= b.lifetime:
		return reasonLifetime
	case be.db.closed || be.db.refs == 0:
		// Its pool was closed meanwhile: none of its sessions is reused.
		return reasonUnused
	case b.overLimitLocked(be.db):
		if be.db.srv.lease.coord != nil {
			return reasonFleet
		}
		return reasonBudgetShrink
	}
	return reasonNone
}

// starvingLocked returns a caller of another pool, waiting for a token for
// at least handoffAfter, that the token of p's backend being checked in
// would serve. Below that wait, hot pools keep passing their backends
// between their own callers; above it, a cold workspace would starve.
func (b *budget) starvingLocked(p *backendPool, now time.Time) *waiter {
	if p.tokens.live() <= p.tokens.reserved {
		return nil // closing this backend frees no shared token
	}
	s := p.srv
	for w := s.queue.front; w != nil; w = s.queue.next(w) {
		if now.Sub(w.since) < b.handoffAfter {
			return nil // later ones are younger still
		}
		// Only a caller of a pool with no backend starves: one that grows
		// is served by its own meanwhile, and p, which uses this backend
		// now, would likely dial it back (lru.go; inferred).
		if w.claim == nil && w.db != p && w.db.tokens.live() == 0 {
			if !s.dialSlotFree() {
				return nil // its token would wait for a dial slot anyway
			}
			return w
		}
	}
	return nil
}

// overLimitLocked reports whether p holds more live backends than its cap,
// or holds shared ones while the shared tokens are over the limit: both
// after a limit was lowered.
func (b *budget) overLimitLocked(p *backendPool) bool {
	return p.srv.ledger.over(&p.tokens, b.capLocked(p))
}

// discardLocked closes be, which a checkout found dead before using it.
func (b *budget) discardLocked(be *backend) {
	p := be.db
	b.closeBusyLocked(be, reasonBroken, nil)
	b.growLocked(p)
}

// closeBusyLocked closes a backend being checked in. If w is not nil, its
// token goes to w once the server has closed the backend.
func (b *budget) closeBusyLocked(be *backend, reason evictReason, w *waiter) {
	be.db.busy.remove(be)
	b.watch.drop(be)
	b.closeLocked(be, reason, w)
}

// evictLocked closes idle backend v. If w is not nil, v's token goes to w
// once the server has closed v.
func (b *budget) evictLocked(v *backend, reason evictReason, w *waiter) {
	b.unlinkIdleLocked(v)
	b.closeLocked(v, reason, w)
}

// closeIdleLocked closes p's idle backends: nothing of a closed pool's
// sessions may be reused.
func (b *budget) closeIdleLocked(p *backendPool) {
	for p.idleBackends.back != nil {
		b.evictLocked(p.idleBackends.back, reasonUnused, nil)
	}
}

// closeLocked queues busy or idle backend be for closing by unlock, its
// token counted as closing until the server has closed it. If w is not
// nil, w is promised that token.
func (b *budget) closeLocked(be *backend, reason evictReason, w *waiter) {
	p := be.db
	from := be.state
	be.state = backendClosing
	t := be.tok
	if w != nil {
		p.srv.queue.promise(w, t)
		w.evicted = p.workspace
		if w.slotted.IsZero() {
			w.slotted = b.clock.Now()
		}
	}
	if reason != reasonNone {
		b.counters.evictions[reason]++
		p.evictions++
	}
	b.closingLocked(t, from)
	b.jobs++
	b.toClose = append(b.toClose, closeJob{be: be, reason: reason, workspace: p.workspace})
}

// unlinkIdleLocked takes idle backend be out of its pool's idle list, and
// the pool out of the recency lists when that was its last.
func (b *budget) unlinkIdleLocked(be *backend) {
	p := be.db
	p.idleBackends.remove(be)
	if p.idleBackends.len == 0 {
		p.srv.recency.remove(p)
	}
}

// relieveServerLocked closes the least recently used idle backend on p's
// server, which refused a dial of p for lack of connection slots. It
// returns a channel closed once that backend is gone, or nil when nothing
// idle can be closed.
func (b *budget) relieveServerLocked(p *backendPool) <-chan struct{} {
	v := p.srv.recency.victim()
	if v == nil {
		return nil
	}
	t := v.tok
	if t.gone == nil {
		t.gone = make(chan struct{})
	}
	b.evictLocked(v, reasonServerFull, nil)
	return t.gone
}

// shrinkLocked evicts idle backends of s until every pool is within its cap
// and the shared tokens within s's limit, counting backends already closing
// as gone.
func (b *budget) shrinkLocked(s *server) { b.shrinkOverLocked(s, reasonBudgetShrink) }

// shrinkOverLocked is shrinkLocked, closing backends for reason.
func (b *budget) shrinkOverLocked(s *server, reason evictReason) {
	s.recency.each(func(x *backendPool) {
		for x.tokens.live() > b.capLocked(x) && x.idleBackends.back != nil {
			b.evictLocked(x.idleBackends.back, reason, nil)
		}
	})
	for s.ledger.sharedOver() {
		v := s.recency.victim()
		if v == nil {
			return
		}
		b.evictLocked(v, reason, nil)
	}
}
