package tenantpg

import "time"

// defaultLivenessAfter is how long a backend must have been idle before its
// checkout peeks at the socket for a server that closed it (a terminated
// backend, a restart). The peek is a non-blocking system call (about a
// microsecond); backends reused sooner skip it, and pgx's own ping covers
// those idle for more than a second.
const defaultLivenessAfter = 50 * time.Millisecond

// roomLocked reports whether d may take a token of its server now without
// evicting.
func (b *budget) roomLocked(d *backendPool) bool {
	s := d.srv
	return s.open < s.limit && (d.open < d.reserved || s.sharedInUse < s.limit-s.reserved)
}

// dequeueLocked takes a waiter that was not served out of both queues.
func (b *budget) dequeueLocked(w *waiter) {
	d := w.db
	if w.patience != nil {
		w.patience.Stop()
	}
	d.waiters.remove(w)
	b.waiting--
	d.srv.waiting--
	if w.seekingLocked() {
		b.unseekLocked(w)
	}
}

// unseekLocked takes w out of the budget's queue, dropping any claim; it
// stays queued on its database.
func (b *budget) unseekLocked(w *waiter) {
	w.db.seeking--
	w.db.srv.queue.remove(w)
	b.dropClaimLocked(w)
	if s := w.db.srv; s != nil && s.prober == w {
		// The probe's caller left before it could dial: another caller
		// probes in its place.
		s.prober = nil
		b.probeEndedLocked(s, b.clock.Now(), false)
	}
}

// serveLocked ends w's wait, served with a backend or a token.
func (b *budget) serveLocked(w *waiter, now time.Time) {
	b.dequeueLocked(w)
	b.waitDuration += now.Sub(w.since)
	w.done = true
	close(w.ready)
}

// grantLocked gives w a token to dial a backend of its database.
func (b *budget) grantLocked(w *waiter, now time.Time) {
	d := w.db
	b.takeLocked(d)
	b.dialingLocked(d)
	w.tok = &token{db: d, paceEpoch: d.srv.pace.epoch}
	if w.slotted.IsZero() {
		w.slotted = now
	}
	if s := d.srv; s != nil && s.prober == w {
		s.prober = nil // its dial is the probe now
		w.tok.probe = true
	}
	b.serveLocked(w, now)
}

// handOverLocked gives w the backend be, which another caller of the same
// database is checking in: no dial, no eviction.
func (b *budget) handOverLocked(w *waiter, be *backend, now time.Time) {
	// Only waits for a backend of the database count as its debt: a wait for
	// a token measures the budget, not whether the database needs another
	// backend.
	w.db.owe(now.Sub(w.since), now)
	b.handoffs++
	b.checkoutLocked(be, now, w.stack)
	w.be = be
	b.serveLocked(w, now)
}

// seekLocked puts w, queued on its database, in the budget's queue too: it
// is to dial a backend as soon as it gets a token, unless a backend of its
// database is checked in first.
func (b *budget) seekLocked(w *waiter) {
	if w.sought.IsZero() {
		w.sought = b.clock.Now()
	}
	s := w.db.srv
	w.db.seeking++
	s.queue.pushBack(w)
	if s.fleet != nil && !b.roomLocked(w.db) {
		s.fleet.poke() // more slots may be leased from the fleet
	}
	b.serveQueueLocked(s)
}

// growLocked lets waiters of d dial while its pool should grow (see
// shouldDialLocked in connector.go).
func (b *budget) growLocked(d *backendPool) {
	if d.seeking > 0 && d.open-d.closing == 0 {
		// Its last backend closed: its seekers, which grew and found
		// no spare backend to take, are misses now and may evict.
		b.serveQueueLocked(d.srv)
	}
	if d.waiters.len == d.seeking {
		return
	}
	now := b.clock.Now()
	if d.serverDown() {
		b.startProbeLocked(d.srv, now) // its callers wait for the probe instead
		return
	}
	for d.waiters.len > d.seeking && b.shouldDialLocked(d, now) {
		w := d.waiters.front
		for w.seekingLocked() {
			w = d.waiters.next(w)
		}
		d.waitDebt = 0 // the new backend pays for the waits so far
		b.seekLocked(w)
	}
}

// serveQueueLocked gives free tokens to the callers that are to dial, in
// arrival order, and for those that no free token can serve, starts
// evicting the least recently used idle backends, each promised to one
// caller. It runs after every event that can make room: a token released, a
// caller queued, a reservation or the budget changed, a backend gone idle.
func (b *budget) serveQueueLocked(s *server) {
	if s.queue.len == 0 {
		return
	}
	now := b.clock.Now()
	// paced: a caller was skipped for want of a dial slot; freed: a claim
	// was dropped after it, which frees one; short: a caller found no
	// free token.
	paced, freed, short := false, false, false
	for w := s.queue.front; w != nil; {
		next := s.queue.next(w)
		d := w.db
		switch {
		case d.open-d.closing >= b.capLocked(d):
			// A lowered cap: it can only wait for a backend of its own.
			freed = freed || paced && w.claim != nil
			b.unseekLocked(w)
		case w.claim == nil && !s.dialSlotFreeLocked():
			// Paced: it waits for a dial slot holding no token and
			// evicting nothing; its victim is chosen when its dial can
			// start. A caller behind it with a claim holds a slot already.
			paced = true
		case b.roomLocked(d):
			// A token freed before the claimed one, if any: take it, and
			// let the claimed one go to whoever is first when released.
			b.dropClaimLocked(w)
			b.grantLocked(w, now)
		case w.claim != nil:
		default:
			short = true
			switch v := s.recency.victimForLocked(d, now); {
			case v != nil:
				b.evictLocked(v, reasonLRU, w)
			case d.open-d.closing > 0:
				// Growth, and no spare backend to take: it waits for its
				// own backends (lru.go); a later miss may still evict.
			case s.reserved == 0:
				b.shortLocked(s)
				return // no later caller can be served either
			}
		}
		w = next
	}
	if short {
		b.shortLocked(s)
	}
	if freed {
		b.serveQueueLocked(s) // a caller skipped for a slot may have one now
	}
}

// shortLocked records that a caller that is to dial found no free token of
// s: with a fleet budget, more slots may be leased.
func (b *budget) shortLocked(s *server) {
	if s.fleet != nil {
		s.fleet.poke()
	}
}

// checkoutLocked marks be checked out by a caller, whose stack it keeps
// for leak detection.
func (b *budget) checkoutLocked(be *backend, now time.Time, stack []uintptr) {
	d := be.db
	if be.state == backendBusy {
		d.busy.remove(be) // handed over: a new use starts now
		b.unwatchLocked(be)
	} else {
		d.inUse++
		d.srv.inUse++
	}
	be.state = backendBusy
	be.checkedOut = now
	be.stack = stack
	d.busy.pushBack(be)
	if th := b.leakThreshold.Load(); th > 0 {
		b.watched.pushBack(be)
		if !b.leakCheck.armed {
			b.armLeakCheckLocked(now.Add(time.Duration(th)), now)
		}
	}
}

// dropClaimLocked takes back the token w was promised, if any.
func (b *budget) dropClaimLocked(w *waiter) {
	if w.claim != nil {
		w.claim.claim = nil
		w.claim = nil
		w.db.srv.claims--
	}
}
