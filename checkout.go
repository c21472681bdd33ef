package tenantpg

import "time"

// A checkout: the transitions from a caller asking for a backend of its
// pool to the caller holding one.
//
// A checkout takes the pool's most recently used idle backend when there is
// one (reuseLocked). Otherwise the caller queues on the pool (queueLocked)
// and waits there for a backend another caller checks in (handOverLocked,
// from checkin.go) unless the pool should grow (growLocked, by the rule of
// growth.go) or the caller runs out of patience (budget.impatient), in
// which case it also joins its server's dial queue (seekLocked), for a
// token: a free one, or the token of an idle backend closed for it
// (serveQueueLocked, with the victim chosen by lru.go and the dials paced
// by pace.go). With a token it dials (token.go); whichever comes first
// serves it. A wait that ends first gets an error (giveUpLocked).

// defaultLivenessAfter is how long a backend must have been idle before its
// checkout peeks at the socket for a server that closed it (a terminated
// backend, a restart). The peek is a non-blocking system call (about a
// microsecond); backends reused sooner skip it, and pgx's own ping covers
// those idle for more than a second.
const defaultLivenessAfter = 50 * time.Millisecond

// reuseLocked checks out be, idle, for a caller with stack, at now.
func (b *budget) reuseLocked(be *backend, now time.Time, stack []uintptr) {
	p := be.db
	b.unlinkIdleLocked(be)
	p.srv.ledger.reuse(&p.tokens)
	b.checkoutLocked(be, now, stack)
	p.srv.recency.reused(p, p.srv.ledger.limit)
}

// checkoutLocked marks be checked out by a caller at now, keeping the
// caller's stack for leak detection. be was idle, just dialed, or is handed
// over by the caller that held it.
func (b *budget) checkoutLocked(be *backend, now time.Time, stack []uintptr) {
	p := be.db
	if be.state == backendBusy {
		p.busy.remove(be) // handed over: a new use starts now
		b.watch.drop(be)
	}
	be.state = backendBusy
	be.checkedOut = now
	be.stack = stack
	p.busy.pushBack(be)
	if th := b.leakThreshold.Load(); th > 0 && b.watch.add(be) {
		b.armLeakCheckLocked(now.Add(time.Duration(th)), now)
	}
}

// queueLocked queues a caller of p that found no idle backend at now, and
// returns its waiter: served already, seeking a token, or waiting for a
// backend with its patience armed.
func (b *budget) queueLocked(p *backendPool, now time.Time, stack []uintptr) *waiter {
	w := &waiter{db: p, since: now, ready: make(chan struct{}), stack: stack}
	p.refs++ // a waiter keeps its pool's state alive
	p.waiters.pushBack(w)
	b.waiting++
	p.srv.waiting++
	b.growLocked(p)
	if !w.done {
		b.counters.waitCount++ // not served at once: it waits
		if b.strays.count > 0 {
			b.collectLocked(now)
		}
	}
	if !w.seeking() && !w.done {
		w.patience = b.clock.AfterFunc(b.dialCostLocked(p), func() { b.impatient(w) })
	}
	return w
}

// impatientLocked lets w dial when it has waited as long as a dial takes,
// unless its pool is at its cap: its backends are held longer than the use
// time measured so far (a pinned connection, a long transaction), or
// nothing was measured yet.
func (b *budget) impatientLocked(w *waiter) {
	p := w.db
	if !w.done && !w.seeking() && p.tokens.live()+p.waiters.seeking < b.capLocked(p) && !p.serverDown() {
		b.seekLocked(w)
	}
}

// giveUpLocked ends at now the wait of w, whose context ended (deadline:
// the acquire timeout, rather than the caller's own context; callerErr: the
// caller's context's error). What was given to w meanwhile goes to the next
// caller. It returns a *ServerDownError while w's server is down, a
// *BudgetError otherwise.
func (b *budget) giveUpLocked(w *waiter, now time.Time, deadline bool, callerErr error) error {
	p := w.db
	if w.done {
		// The grant raced with the end of the wait: pass on what it got.
		if w.be != nil {
			b.checkinLocked(w.be, now, false)
		} else {
			b.giveLocked(p, backendDialing)
			w.tok.dialDone = true
			if p.srv.circuit.isProbe(w.tok) {
				b.probeEndedLocked(p.srv, now, false) // never dialed: no news of the server
			}
			b.serveQueueLocked(p.srv)
			b.growLocked(p)
		}
	} else {
		if !w.seeking() {
			p.growth.owe(now.Sub(w.since), now) // it waited for a backend of p
		}
		b.dequeueLocked(w)
		w.done = true // out of the queues: a patience timer that fired meanwhile must not queue it again
		b.counters.waitDuration += now.Sub(w.since)
		// It may have held a dial slot, and been the one to dial for those
		// queued behind it.
		b.serveQueueLocked(p.srv)
		b.growLocked(p)
	}
	waited := now.Sub(w.since)
	if deadline {
		b.counters.timeouts++
	}
	if s := p.srv; s != nil && s.circuit.down {
		return b.serverDownErrorLocked(p, now, waited, s.circuit.lastErr, callerErr)
	}
	b.counters.exhausted++
	s := p.srv
	e := &BudgetError{
		Workspace: p.workspace, Database: p.name,
		Server: s.label, Open: s.ledger.open, Limit: s.ledger.limit,
		DatabaseOpen: p.tokens.open, DatabaseCap: b.capLocked(p),
		Waiting: s.waiting, Waited: waited, Err: callerErr,
	}
	b.eventLocked(event{kind: evExhausted, exhausted: e})
	return e
}

// dequeueLocked takes a waiter that was not served out of both queues.
func (b *budget) dequeueLocked(w *waiter) {
	p := w.db
	if w.patience != nil {
		w.patience.Stop()
	}
	p.waiters.remove(w)
	b.waiting--
	p.srv.waiting--
	if w.seeking() {
		b.unseekLocked(w)
	}
}

// unseekLocked takes w out of its server's dial queue, dropping any claim;
// it stays queued on its pool.
func (b *budget) unseekLocked(w *waiter) {
	s := w.db.srv
	s.queue.leave(w)
	if s.circuit.prober == w {
		// The probe's caller left before it could dial: another caller
		// probes in its place.
		s.circuit.prober = nil
		b.probeEndedLocked(s, b.clock.Now(), false)
	}
}

// serveLocked ends w's wait, served with a backend or a token.
func (b *budget) serveLocked(w *waiter, now time.Time) {
	b.dequeueLocked(w)
	b.counters.waitDuration += now.Sub(w.since)
	w.finish()
}

// grantLocked gives w a token to dial a backend of its pool.
func (b *budget) grantLocked(w *waiter, now time.Time) {
	p := w.db
	s := p.srv
	b.takeLocked(p)
	b.counters.dials++
	w.tok = &token{db: p, paceEpoch: s.pace.epoch}
	if w.slotted.IsZero() {
		w.slotted = now
	}
	if s.circuit.prober == w {
		s.circuit.prober = nil // its dial is the probe now
		s.circuit.startProbeTok(w.tok)
	}
	b.serveLocked(w, now)
}

// handOverLocked gives w the backend be, which another caller of the same
// pool is checking in: no dial, no eviction.
func (b *budget) handOverLocked(w *waiter, be *backend, now time.Time) {
	// Only waits for a backend of the pool count as its debt: a wait for a
	// token measures the budget, not whether the pool needs another
	// backend.
	w.db.growth.owe(now.Sub(w.since), now)
	b.counters.handoffs++
	b.checkoutLocked(be, now, w.stack)
	w.be = be
	b.serveLocked(w, now)
}

// seekLocked puts w, queued on its pool, in its server's dial queue too: it
// is to dial a backend as soon as it gets a token, unless a backend of its
// pool is checked in first.
func (b *budget) seekLocked(w *waiter) {
	if w.sought.IsZero() {
		w.sought = b.clock.Now()
	}
	s := w.db.srv
	s.queue.join(w)
	if s.lease.coord != nil && !w.db.room() {
		s.lease.coord.poke() // more slots may be leased from the fleet
	}
	b.serveQueueLocked(s)
}

// growLocked lets waiters of p dial while its pool should grow (growth.go).
func (b *budget) growLocked(p *backendPool) {
	if p.waiters.seeking > 0 && p.tokens.live() == 0 {
		// Its last backend closed: its seekers, which grew and found
		// no spare backend to take, are misses now and may evict.
		b.serveQueueLocked(p.srv)
	}
	if p.waiters.len == p.waiters.seeking {
		return
	}
	now := b.clock.Now()
	if p.serverDown() {
		b.startProbeLocked(p.srv, now) // its callers wait for the probe instead
		return
	}
	for p.waiters.len > p.waiters.seeking && b.shouldDialLocked(p, now) {
		w := p.waiters.front
		for w.seeking() {
			w = p.waiters.next(w)
		}
		p.growth.paid() // the new backend pays for the waits so far
		b.seekLocked(w)
	}
}

// shouldDialLocked applies the growth rule to p at now.
func (b *budget) shouldDialLocked(p *backendPool, now time.Time) bool {
	return p.growth.shouldDial(p.tokens.live()+p.waiters.seeking, p.waiters.forBackend(), b.capLocked(p), b.dialCostLocked(p), now)
}

// dialCostLocked is what a new backend for p costs: the average dial time,
// twice that when the budget is full and the dial evicts another pool's
// backend, which that pool is likely to dial again (for growth only a spare
// one, of a pool that keeps another: lru.go).
func (b *budget) dialCostLocked(p *backendPool) time.Duration {
	if !p.room() {
		return 2 * b.dialTime.duration()
	}
	return b.dialTime.duration()
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
		p := w.db
		switch {
		case p.tokens.live() >= b.capLocked(p):
			// A lowered cap: it can only wait for a backend of its own.
			freed = freed || paced && w.claim != nil
			b.unseekLocked(w)
		case w.claim == nil && !s.dialSlotFree():
			// Paced: it waits for a dial slot holding no token and
			// evicting nothing; its victim is chosen when its dial can
			// start. A caller behind it with a claim holds a slot already.
			paced = true
		case p.room():
			// A token freed before the claimed one, if any: take it, and
			// let the claimed one go to whoever is first when released.
			s.queue.dropClaim(w)
			b.grantLocked(w, now)
		case w.claim != nil:
		default:
			short = true
			switch v := s.recency.victimFor(p, now); {
			case v != nil:
				b.evictLocked(v, reasonLRU, w)
			case p.tokens.live() > 0:
				// Growth, and no spare backend to take: it waits for its
				// own backends (lru.go); a later miss may still evict.
			case s.ledger.reserved == 0:
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
	if s.lease.coord != nil {
		s.lease.coord.poke()
	}
}
