package tenantpg

// The eviction policy: segmented recency (SLRU) over databases with idle
// backends. A database one of whose backends was reused (checked out from
// idle, or passed from one caller straight to the next) is protected, and
// databases on probation, which got backends and have not reused one, are
// evicted first. A long tail of workspaces each seen once then cycles
// through probation instead of evicting the backends hot workspaces reuse;
// the protected segment is bounded, so a workspace that cooled off is
// demoted and evicted in turn.
//
// Only databases with idle backends are in the lists, so choosing a victim
// is bounded by the budget, not by the number of databases, and usually
// stops at the first. Every method is called with budget.mu held.
type slru struct {
	// Most recently used first; probation is evicted before protected.
	probation list[database, dbInRecency]
	protected list[database, dbInRecency]
	// protectedOpen is Σ db.open over protected databases; above
	// protectedLimit the least recently used protected database is demoted.
	protectedOpen int
}

type dbInRecency struct{}

func (dbInRecency) links(d *database) *links[database] { return &d.lru }

// segmentOf returns the list d belongs in.
func (s *slru) segmentOf(d *database) *list[database, dbInRecency] {
	if d.protected {
		return &s.protected
	}
	return &s.probation
}

// touchLocked moves d, which has idle backends, to the front of its segment.
func (s *slru) touchLocked(d *database) {
	l := s.segmentOf(d)
	if d.lru.listed {
		l.moveToFront(d)
	} else {
		l.pushFront(d)
	}
}

// removeLocked takes d, which has no idle backend left, out of the lists.
func (s *slru) removeLocked(d *database) { s.segmentOf(d).remove(d) }

// reusedLocked records a hit: a backend of d was used again. A database on
// probation is promoted; when that makes the protected segment hold more
// than its share of the budget, the least recently used protected database
// with idle backends goes back on probation.
func (s *slru) reusedLocked(d *database) {
	if !d.protected {
		if d.lru.listed {
			s.probation.remove(d)
		}
		d.protected = true
		s.protectedOpen += d.open
		// One demotion per promotion, as in SLRU: databases whose backends
		// are all busy count but cannot be demoted, and demoting until
		// under the limit could empty the segment.
		if x := s.protected.back; x != nil && s.protectedOpen > protectedLimit(d.srv.limit) {
			s.protected.remove(x)
			x.protected = false
			s.protectedOpen -= x.open
			s.probation.pushFront(x)
		}
	}
	if d.idleBackends.len > 0 {
		s.touchLocked(d)
	}
}

// protectedLimit is the protected segment's share of the budget: 80%, the
// usual SLRU split; on a Zipf(1.1) trace over 400 databases it measured
// 58% hits with 20 slots where plain LRU measured 48%.
func protectedLimit(limit int) int { return max(1, limit*4/5) }

// victimLocked returns the idle backend to close to free a shared token:
// the longest-idle backend of the least recently used database, probation
// first. It skips databases whose backends all sit within their
// reservation, as closing one would free no shared token.
func (s *slru) victimLocked() *backend {
	for _, l := range [2]*list[database, dbInRecency]{&s.probation, &s.protected} {
		for x := l.back; x != nil; x = l.prev(x) {
			if x.open-x.closing > x.reserved {
				return x.idleBackends.back
			}
		}
	}
	return nil
}

// eachLocked calls fn for every database with idle backends in eviction
// order. fn may evict them.
func (s *slru) eachLocked(fn func(*database)) {
	for _, l := range [2]*list[database, dbInRecency]{&s.probation, &s.protected} {
		for x := l.back; x != nil; {
			prev := l.prev(x)
			fn(x)
			x = prev
		}
	}
}
