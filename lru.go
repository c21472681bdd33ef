package tenantpg

import "time"

// The eviction policy: segmented recency (SLRU) over pools with idle
// backends. A pool one of whose backends was reused (checked out from
// idle, or passed from one caller straight to the next) is protected, and
// pools on probation, which got backends and have not reused one, are
// evicted first. A long tail of workspaces each seen once then cycles
// through probation instead of evicting the backends hot workspaces reuse;
// the protected segment is bounded, so a workspace that cooled off is
// demoted and evicted in turn.
//
// Only pools with idle backends are in the lists, so choosing a victim is
// bounded by the budget, not by the number of pools, and usually stops at
// the first. The policy decides which backend to close; the budget closes
// it (checkout.go, checkin.go).
//
// A pool that grows (it holds a backend and wants another) takes only
// a spare backend when the budget is full: an idle one of a pool that
// holds at least one more, idle for spareIdleAfter (victimFor).
// Evicting a pool's last backend costs it a dial when it is next
// used, and in a budget that holds every active workspace's backend that
// is soon: hot workspaces growing to their cap by evicting the only
// backend of colder ones made those dial again and again (BENCHMARKS.md,
// "Fits in the budget": 2,800 evictions in 10 s, a fifth of the ceiling).
// The grower's callers are served by its own backends meanwhile. A
// pool with no backend (a miss) takes a spare backend too if there is
// one, and otherwise the least recently used idle one: it cannot be served
// otherwise. The spare lists hold, in the same order as the segment lists,
// the listed pools with two or more live backends, so that a spare
// victim is found without a scan.
//
// slru is one server's eviction order. Guarded by budget.mu; never locks,
// never blocks, holds no *budget.
type slru struct {
	// Most recently used first; probation is evicted before protected.
	probation list[backendPool, poolInRecency]
	protected list[backendPool, poolInRecency]
	// The pools of probation and protected, in the same order, whose
	// idle backends are not their last live one (open - closing >= 2).
	spareProbation list[backendPool, poolSpare]
	spareProtected list[backendPool, poolSpare]
	// protectedOpen is Σ open over protected pools; above
	// protectedLimit the least recently used protected pool is demoted.
	protectedOpen int
}

type poolInRecency struct{}

func (poolInRecency) links(d *backendPool) *links[backendPool] { return &d.lru }

type poolSpare struct{}

func (poolSpare) links(d *backendPool) *links[backendPool] { return &d.spare }

// segmentOf returns the list d belongs in.
func (s *slru) segmentOf(d *backendPool) *list[backendPool, poolInRecency] {
	if d.protected {
		return &s.protected
	}
	return &s.probation
}

// spareOf returns the spare list d belongs in.
func (s *slru) spareOf(d *backendPool) *list[backendPool, poolSpare] {
	if d.protected {
		return &s.spareProtected
	}
	return &s.spareProbation
}

// hasSpare reports whether an idle backend of d would not be its last.
func hasSpare(d *backendPool) bool { return d.tokens.live() >= 2 }

// touch moves d, which has idle backends, to the front of its segment.
func (s *slru) touch(d *backendPool) {
	l := s.segmentOf(d)
	if d.lru.listed {
		l.moveToFront(d)
	} else {
		l.pushFront(d)
	}
	// The front of both lists, so the spare list keeps the segment's order.
	// The listed checks spare the common case, a pool with one backend,
	// a call into the list: list methods are not inlined, and each of
	// their links lookups is an indirect call through the generic
	// dictionary (BenchmarkEvictionDecision at 10 pools: 32.1 ns
	// without these checks, 27.0 with them, 24.4 before the spare lists).
	switch {
	case hasSpare(d) && d.spare.listed:
		s.spareOf(d).moveToFront(d)
	case hasSpare(d):
		s.spareOf(d).pushFront(d)
	case d.spare.listed:
		s.spareOf(d).remove(d)
	}
}

// remove takes d, which has no idle backend left, out of the lists.
func (s *slru) remove(d *backendPool) {
	s.segmentOf(d).remove(d)
	if d.spare.listed {
		s.spareOf(d).remove(d)
	}
}

// liveDropped takes d out of the spare list once its live backends
// dropped below two (one closing, or a dial's token returned). Live
// backends only grow while d has no idle one (a dial is for a waiter, and a
// pool with waiters has no idle backend), so d never joins the list
// other than at the front, when touched.
func (s *slru) liveDropped(d *backendPool) {
	if d.spare.listed && !hasSpare(d) {
		s.spareOf(d).remove(d)
	}
}

// took counts a token taken by d (protectedOpen).
func (s *slru) took(d *backendPool) {
	if d.protected {
		s.protectedOpen++
	}
}

// gave counts a token d gave back. A protected pool left without a backend
// is out of the cache: when it gets one again it starts on probation.
func (s *slru) gave(d *backendPool) {
	if d.protected {
		s.protectedOpen--
		if d.tokens.open == 0 {
			d.protected = false
		}
	}
	s.liveDropped(d)
}

// reused records a hit: a backend of d was used again. A pool on
// probation is promoted; when that makes the protected segment hold more
// than its share of the budget, the least recently used protected pool
// with idle backends goes back on probation.
func (s *slru) reused(d *backendPool, limit int) {
	if !d.protected {
		if d.lru.listed {
			s.probation.remove(d)
			if d.spare.listed {
				s.spareProbation.remove(d) // touch lists it again
			}
		}
		d.protected = true
		s.protectedOpen += d.tokens.open
		// One demotion per promotion, as in SLRU: pools whose backends
		// are all busy count but cannot be demoted, and demoting until
		// under the limit could empty the segment.
		if x := s.protected.back; x != nil && s.protectedOpen > protectedLimit(limit) {
			s.protected.remove(x)
			x.protected = false
			s.protectedOpen -= x.tokens.open
			s.probation.pushFront(x)
			if x.spare.listed {
				s.spareProtected.remove(x)
				s.spareProbation.pushFront(x)
			}
		}
	}
	if d.idleBackends.len > 0 {
		s.touch(d)
	}
}

// protectedLimit is the protected segment's share of the budget: 80%, the
// usual SLRU split; on a Zipf(1.1) trace over 400 pools it measured
// 58% hits with 20 slots where plain LRU measured 48%.
func protectedLimit(limit int) int { return max(1, limit*4/5) }

// victim returns the idle backend to close to free a shared token:
// the longest-idle backend of the least recently used pool, probation
// first. It skips pools whose backends all sit within their
// reservation, as closing one would free no shared token.
func (s *slru) victim() *backend {
	for _, l := range [2]*list[backendPool, poolInRecency]{&s.probation, &s.protected} {
		for x := l.back; x != nil; x = l.prev(x) {
			if x.tokens.live() > x.tokens.reserved {
				return x.idleBackends.back
			}
		}
	}
	return nil
}

// victimFor returns the idle backend to close so that a caller of d
// can dial at now: a spare one first, the longest-idle backend of the least
// recently used pool that keeps another live backend, since closing
// it costs no pool a dial now. Failing that, a miss (d holds no live
// backend) takes victim's, which its callers cannot do without.
//
// Spare first for a miss too: in a budget that holds every active
// pool's backend, a miss that closes another's last backend makes that
// one miss in turn, where taking a spare one leaves every pool one
// (with the step, the W=60 runs' evictions fell from hundreds to tens, on
// a noisy machine; BENCHMARKS.md).
//
// Growth takes a spare backend only once it has been idle for
// spareIdleAfter, and takes no last backend: d's callers wait for its own
// backends meanwhile. A spare backend idle for less is one its pool's
// callers use now and then, which would dial it back as soon as their
// waits added up to a dial. That hot pools took each other's spare
// backends in turn is an inference (the evictions left grew with the
// run's throughput and the idle age removed them); it was not isolated.
// Only the least recently used spare pool's is looked at, so the
// choice stays O(1).
func (s *slru) victimFor(d *backendPool, now time.Time) *backend {
	miss := d.tokens.live() == 0
	for _, l := range [2]*list[backendPool, poolSpare]{&s.spareProbation, &s.spareProtected} {
		for x := l.back; x != nil; x = l.prev(x) {
			if x.tokens.live() > x.tokens.reserved {
				if v := x.idleBackends.back; miss || now.Sub(v.idleSince) >= spareIdleAfter {
					return v
				}
				return nil
			}
		}
	}
	if miss {
		return s.victim()
	}
	return nil
}

// spareIdleAfter is how long a spare backend must have been idle before a
// pool that grows may take it: the horizon over which the grower's own
// need is judged (waitDebtDecay), so that a backend its pool did not
// use over that horizon goes to one whose callers did wait. Only this
// value (1s) was measured.
const spareIdleAfter = waitDebtDecay

// each calls fn for every pool with idle backends in eviction
// order. fn may evict them.
func (s *slru) each(fn func(*backendPool)) {
	for _, l := range [2]*list[backendPool, poolInRecency]{&s.probation, &s.protected} {
		for x := l.back; x != nil; {
			prev := l.prev(x)
			fn(x)
			x = prev
		}
	}
}
