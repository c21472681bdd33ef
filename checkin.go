package tenantpg

import "time"

type evictReason uint8

// Reasons the driver closes a backend.
const (
	reasonNone         evictReason = iota
	reasonLRU                      // idle, closed to give its token to another database
	reasonHandoff                  // closed at check-in for a caller of another database that waited too long
	reasonIdleTimeout              // idle for longer than ConnMaxIdleTime
	reasonLifetime                 // older than ConnMaxLifetime
	reasonBudgetShrink             // the budget or a per-database cap was lowered
	reasonBroken                   // found closed or broken, or returned mid-transaction
	reasonDriverClosed             // Driver.Close
	reasonServerFull               // idle, closed because the server refused a dial for lack of slots
	reasonUnused                   // idle, closed because the last *sql.DB and handle of its database were closed
	reasonAbandoned                // busy, closed because its handle became garbage without being returned
	reasonFleet                    // closed to give its slot to another process of its fleet budget, or after the fleet's share shrank
	numReasons
)

var reasonNames = [numReasons]string{"", "lru", "handoff", "idle_timeout", "lifetime", "budget_shrink", "broken", "driver_closed", "server_full", "unused", "abandoned", "fleet"}

// defaultHandoffAfter bounds how long a caller that needs a token waits
// before it takes the token of the next backend any other database checks
// in. Below it, hot databases pass their backends from caller to caller,
// which costs no dial; above it, a cold workspace is not starved by hot
// ones whose backends never go idle.
const defaultHandoffAfter = 100 * time.Millisecond

// closeIdleLocked closes d's idle backends: nothing of a closed pool's
// sessions may be reused.
func (b *budget) closeIdleLocked(d *backendPool) {
	for d.idleBackends.back != nil {
		b.evictLocked(d.idleBackends.back, reasonUnused, nil)
	}
}

func (b *budget) checkinLocked(be *backend, now time.Time, used bool) {
	d := be.db
	if used {
		d.useTime.add(now.Sub(be.checkedOut), useTimeAlpha)
		d.lastUsed = now
	}
	if reason := b.checkinReasonLocked(be, now); reason != reasonNone {
		b.closeBusyLocked(be, reason, nil)
		b.growLocked(d)
		return
	}
	if w := b.starvingLocked(d, now); w != nil {
		b.closeBusyLocked(be, reasonHandoff, w)
		b.growLocked(d)
		return
	}
	if w := d.waiters.front; w != nil {
		d.srv.recency.reusedLocked(d)
		b.handOverLocked(w, be, now)
		b.growLocked(d)
		b.serveQueueLocked(d.srv) // w may have held a dial slot
		return
	}
	s := d.srv
	d.busy.remove(be)
	b.unwatchLocked(be)
	d.inUse--
	s.inUse--
	be.state = backendIdle
	be.idleSince = now
	d.idleBackends.pushFront(be)
	d.idle++
	s.idle++
	s.recency.touchLocked(d)
	// An armed reaper runs no later than this backend's idle expiry (it is
	// armed for the earliest expiry, and every earlier check-in expires
	// first), so only an earlier end of life needs arming. Skipping the
	// time arithmetic otherwise is a measurable part of a check-in.
	if !b.reaper.armed || b.lifetime > 0 && b.reaper.at.Sub(be.created) > b.lifetime {
		b.armReaperLocked(b.expiryLocked(be), now)
	}
	b.serveQueueLocked(s)
}

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
		if be.db.srv.fleet != nil {
			return reasonFleet
		}
		return reasonBudgetShrink
	}
	return reasonNone
}

// starvingLocked returns a caller of another database, waiting for a token
// for at least handoffAfter, that the token of d's backend being checked in
// would serve. Below that wait, hot databases keep passing their backends
// between their own callers; above it, a cold workspace would starve.
func (b *budget) starvingLocked(d *backendPool, now time.Time) *waiter {
	if d.open-d.closing <= d.reserved {
		return nil // closing this backend frees no shared token
	}
	s := d.srv
	for w := s.queue.front; w != nil; w = s.queue.next(w) {
		if now.Sub(w.since) < b.handoffAfter {
			return nil // later ones are younger still
		}
		// Only a caller of a database with no backend starves: one that
		// grows is served by its own meanwhile, and d, which uses this
		// backend now, would likely dial it back (lru.go; inferred).
		if w.claim == nil && w.db != d && w.db.open-w.db.closing == 0 {
			if !s.dialSlotFreeLocked() {
				return nil // its token would wait for a dial slot anyway
			}
			return w
		}
	}
	return nil
}

// overLimitLocked reports whether d holds more live backends than its cap,
// or holds shared ones while the shared pool is over the budget: both after
// a limit was lowered.
func (b *budget) overLimitLocked(d *backendPool) bool {
	live := d.open - d.closing
	s := d.srv
	return live > b.capLocked(d) || live > d.reserved && s.sharedLive > s.limit-s.reserved
}

// closeBusyLocked closes a backend being checked in. If w is not nil, its
// token goes to w once the server has closed the backend.
func (b *budget) closeBusyLocked(be *backend, reason evictReason, w *waiter) {
	d := be.db
	d.busy.remove(be)
	b.unwatchLocked(be)
	d.inUse--
	d.srv.inUse--
	b.closeLocked(be, reason, w)
}

// evictLocked closes idle backend v. If w is not nil, v's token goes to w
// once the server has closed v.
func (b *budget) evictLocked(v *backend, reason evictReason, w *waiter) {
	b.unlinkIdleLocked(v)
	b.closeLocked(v, reason, w)
}

func (b *budget) closeLocked(be *backend, reason evictReason, w *waiter) {
	be.state = backendClosing
	t := be.tok
	if w != nil {
		t.claim = w
		w.claim = t
		be.db.srv.claims++
		w.evicted = be.db.workspace
		if w.slotted.IsZero() {
			w.slotted = b.clock.Now()
		}
	}
	b.countEvictionLocked(be.db, reason)
	b.markClosingLocked(t)
	b.jobs++
	b.toClose = append(b.toClose, closeJob{be: be, reason: reason, workspace: be.db.workspace})
}

func (b *budget) countEvictionLocked(d *backendPool, reason evictReason) {
	if reason != reasonNone {
		b.evictions[reason]++
		d.evictions++
	}
}

// unlinkIdleLocked takes idle backend be out of the idle lists without
// touching its database's recency.
func (b *budget) unlinkIdleLocked(be *backend) {
	d := be.db
	d.idleBackends.remove(be)
	d.idle--
	d.srv.idle--
	if d.idleBackends.len == 0 {
		d.srv.recency.removeLocked(d)
	}
}
