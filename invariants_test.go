package tenantpg

import "fmt"

// checkInvariantsLocked checks the budget's bookkeeping against itself: the
// counters against the lists, the databases, the backends and the waiters.
// It is the shared invariant of the state-machine fuzz test and of every
// server test at quiescence. It returns the first violation found.
func (b *budget) checkInvariantsLocked() error {
	servers := map[*server]*serverSums{}
	var open, waiting int
	for d := range b.dbs {
		if d.open != d.dialing+d.inUse+d.idle+d.closing {
			return fmt.Errorf("database %q: open %d != dialing %d + inUse %d + idle %d + closing %d",
				d.workspace, d.open, d.dialing, d.inUse, d.idle, d.closing)
		}
		if d.open < 0 || d.dialing < 0 || d.inUse < 0 || d.idle < 0 || d.closing < 0 || d.seeking < 0 || d.refs < 0 {
			return fmt.Errorf("database %q: a negative counter: open %d dialing %d inUse %d idle %d closing %d seeking %d refs %d",
				d.workspace, d.open, d.dialing, d.inUse, d.idle, d.closing, d.seeking, d.refs)
		}
		if d.refs == 0 && d.open == 0 {
			return fmt.Errorf("database %q: nothing uses it, no backend, and not forgotten", d.workspace)
		}
		if d.idle != d.idleBackends.len || d.inUse != d.busy.len {
			return fmt.Errorf("database %q: idle %d inUse %d but %d idle and %d busy backends listed",
				d.workspace, d.idle, d.inUse, d.idleBackends.len, d.busy.len)
		}
		if d.idle > 0 && d.waiters.len > 0 {
			return fmt.Errorf("database %q: %d idle backends while %d callers wait for one", d.workspace, d.idle, d.waiters.len)
		}
		if (d.idle > 0) != d.lru.listed {
			return fmt.Errorf("database %q: idle %d, in the recency list %v", d.workspace, d.idle, d.lru.listed)
		}
		if live := d.open - d.closing; live > b.capLocked(d) && !b.closed && d.idle > 0 {
			return fmt.Errorf("database %q: %d live backends over its cap %d with one idle", d.workspace, live, b.capLocked(d))
		}
		for be := d.idleBackends.front; be != nil; be = d.idleBackends.next(be) {
			if be.state != backendIdle || be.db != d {
				return fmt.Errorf("database %q: a backend in state %d in its idle list", d.workspace, be.state)
			}
			if n := d.idleBackends.next(be); n != nil && n.idleSince.After(be.idleSince) {
				return fmt.Errorf("database %q: idle list out of check-in order", d.workspace)
			}
		}
		for be := d.busy.front; be != nil; be = d.busy.next(be) {
			if be.state != backendBusy || be.db != d {
				return fmt.Errorf("database %q: a backend in state %d in its busy list", d.workspace, be.state)
			}
			if n := d.busy.next(be); n != nil && n.checkedOut.Before(be.checkedOut) {
				return fmt.Errorf("database %q: busy list out of checkout order", d.workspace)
			}
		}
		dbSeeking := 0
		for w := d.waiters.front; w != nil; w = d.waiters.next(w) {
			if w.db != d || w.done {
				return fmt.Errorf("database %q: a served or foreign waiter queued", d.workspace)
			}
			if w.seekingLocked() != d.srv.queue.contains(w) {
				return fmt.Errorf("database %q: a waiter seeking %v, in its server's queue %v", d.workspace, w.seekingLocked(), d.srv.queue.contains(w))
			}
			if w.seekingLocked() {
				dbSeeking++
			}
		}
		if dbSeeking != d.seeking {
			return fmt.Errorf("database %q: seeking %d, %d waiters seeking", d.workspace, d.seeking, dbSeeking)
		}
		if d.srv == nil || b.servers[d.srv.key] != d.srv {
			return fmt.Errorf("database %q: not on the circuit of its server", d.workspace)
		}
		x := servers[d.srv]
		if x == nil {
			x = &serverSums{}
			servers[d.srv] = x
		}
		x.dbs++
		if d.serverDown() {
			// Its callers wait for the server's probe, not for a dial of
			// their own; only the probe's caller seeks a token.
			if d.waiters.len > 0 && d.open-d.closing == 0 && !d.srv.probing && !d.srv.wake.armed && !b.closed {
				return fmt.Errorf("database %q: %d callers wait on server %s, down, with no probe under way or scheduled",
					d.workspace, d.waiters.len, d.srv.label)
			}
			for w := d.waiters.front; w != nil; w = d.waiters.next(w) {
				if w.seekingLocked() && w != d.srv.prober {
					return fmt.Errorf("database %q: a caller seeks a token while server %s is down and it is not the probe", d.workspace, d.srv.label)
				}
			}
		} else if d.waiters.len > 0 && d.open-d.closing+d.seeking == 0 {
			return fmt.Errorf("database %q: %d callers wait and no backend is there or to be dialed", d.workspace, d.waiters.len)
		}
		open += d.open
		waiting += d.waiters.len
		x.open += d.open
		x.dialing += d.dialing
		x.inUse += d.inUse
		x.idle += d.idle
		x.closing += d.closing
		x.shared += max(0, d.open-d.reserved)
		x.live += liveShared(d)
		x.reserved += d.reserved
		x.seeking += d.seeking
		x.waiting += d.waiters.len
		if d.lru.listed {
			x.idleDBs++
		}
		if d.protected {
			x.protectedOpen += d.open
			if d.open == 0 {
				return fmt.Errorf("database %q protected without a backend", d.workspace)
			}
		}
	}
	switch {
	case open != b.open:
		return fmt.Errorf("budget open %d != sum over databases %d", b.open, open)
	case waiting != b.waiting:
		return fmt.Errorf("%d callers waiting, databases queue %d", b.waiting, waiting)
	case b.peakOpen < b.open:
		return fmt.Errorf("peak %d below open %d", b.peakOpen, b.open)
	}
	for s, x := range servers {
		if err := s.checkInvariantsLocked(b, x); err != nil {
			return fmt.Errorf("server %s: %w", s.label, err)
		}
	}
	if len(servers) != len(b.servers) {
		return fmt.Errorf("%d circuits, databases are on %d servers", len(b.servers), len(servers))
	}
	for s, x := range servers {
		switch {
		case s.refs != x.dbs:
			return fmt.Errorf("server %s: %d references, %d databases on it", s.label, s.refs, x.dbs)
		case !s.down && (s.probing || s.prober != nil):
			return fmt.Errorf("server %s: up with a probe under way", s.label)
		case s.prober != nil && (!s.probing || !s.prober.seekingLocked() || s.prober.db.srv != s):
			return fmt.Errorf("server %s: its probe's caller is not seeking a token", s.label)
		}
	}
	for be := b.watched.front; be != nil; be = b.watched.next(be) {
		if be.state != backendBusy || be.leaked {
			return fmt.Errorf("a backend of %q watched for leaks in state %d, reported %v", be.db.workspace, be.state, be.leaked)
		}
	}
	if b.watched.len > 0 && !b.leakCheck.armed && !b.closed {
		return fmt.Errorf("%d backends watched for leaks and no check armed", b.watched.len)
	}
	if b.strays < 0 {
		return fmt.Errorf("strays %d", b.strays)
	}
	return nil
}

// serverSums are the sums over one server's databases.
type serverSums struct {
	dbs, open, dialing, inUse, idle, closing, shared, live, reserved, seeking, waiting, idleDBs, protectedOpen int
}

// checkInvariantsLocked checks one server's budget against the sums over
// its databases.
func (s *server) checkInvariantsLocked(b *budget, x *serverSums) error {
	switch {
	case x.open != s.open || x.dialing != s.dialing || x.inUse != s.inUse || x.idle != s.idle || x.closing != s.closing:
		return fmt.Errorf("counters (open %d dialing %d inUse %d idle %d closing %d) != sum over databases (%d %d %d %d %d)",
			s.open, s.dialing, s.inUse, s.idle, s.closing, x.open, x.dialing, x.inUse, x.idle, x.closing)
	case x.shared != s.sharedInUse:
		return fmt.Errorf("sharedInUse %d, but databases hold %d beyond their reservations", s.sharedInUse, x.shared)
	case x.live != s.sharedLive:
		return fmt.Errorf("sharedLive %d, but databases hold %d live beyond their reservations", s.sharedLive, x.live)
	case x.reserved != s.reserved:
		return fmt.Errorf("reserved %d, but databases reserve %d", s.reserved, x.reserved)
	case x.idleDBs != s.recency.probation.len+s.recency.protected.len:
		return fmt.Errorf("%d databases in the recency lists, %d listed as idle", s.recency.probation.len+s.recency.protected.len, x.idleDBs)
	case x.protectedOpen != s.recency.protectedOpen:
		return fmt.Errorf("protectedOpen %d, but protected databases hold %d", s.recency.protectedOpen, x.protectedOpen)
	case x.seeking != s.queue.len:
		return fmt.Errorf("%d callers in its queue, databases count %d seeking", s.queue.len, x.seeking)
	case x.waiting != s.waiting:
		return fmt.Errorf("%d callers waiting, databases queue %d", s.waiting, x.waiting)
	case s.peakOpen < s.open:
		return fmt.Errorf("peak %d below open %d", s.peakOpen, s.open)
	case s.open > s.limit && s.sharedLive > s.limit-s.reserved && s.recency.victimLocked() != nil && !b.closed:
		return fmt.Errorf("open %d over the budget %d with an idle shared backend left", s.open, s.limit)
	}
	for x := s.recency.probation.front; x != nil; x = s.recency.probation.next(x) {
		if x.protected {
			return fmt.Errorf("protected database %q on probation", x.workspace)
		}
	}
	for x := s.recency.protected.front; x != nil; x = s.recency.protected.next(x) {
		if !x.protected {
			return fmt.Errorf("database %q on probation in the protected list", x.workspace)
		}
	}
	// The spare lists are the segments' databases that hold two live
	// backends or more, in the segments' order.
	for _, seg := range [2]struct {
		l     *list[backendPool, dbInRecency]
		spare *list[backendPool, dbSpare]
	}{{&s.recency.probation, &s.recency.spareProbation}, {&s.recency.protected, &s.recency.spareProtected}} {
		y, n := seg.spare.front, 0
		for x := seg.l.front; x != nil; x = seg.l.next(x) {
			if !hasSpare(x) {
				if x.spare.listed {
					return fmt.Errorf("database %q in a spare list with %d live backends", x.workspace, x.open-x.closing)
				}
				continue
			}
			if y != x {
				return fmt.Errorf("database %q, %d live backends with one idle, not next in its spare list", x.workspace, x.open-x.closing)
			}
			y = seg.spare.next(y)
			n++
		}
		if n != seg.spare.len {
			return fmt.Errorf("%d databases in a spare list, %d in its segment with a spare backend", seg.spare.len, n)
		}
	}
	claims := 0
	for w := s.queue.front; w != nil; w = s.queue.next(w) {
		if w.claim != nil {
			claims++
		}
		if w.db.srv != s {
			return fmt.Errorf("a waiter of %q, on another server, in its queue", w.db.workspace)
		}
	}
	if claims != s.claims {
		return fmt.Errorf("%d waiters hold a claim; the server counts %d", claims, s.claims)
	}
	for w := s.queue.front; w != nil; w = s.queue.next(w) {
		if w.claim != nil && w.claim.claim != w {
			return fmt.Errorf("a waiter of %q claims a token promised elsewhere", w.db.workspace)
		}
		// Paced: a waiter without a claim may wait for a dial slot.
		if w.claim == nil && !b.closed && b.roomLocked(w.db) && w.db.open-w.db.closing < b.capLocked(w.db) && s.dialSlotFreeLocked() {
			return fmt.Errorf("a waiter of %q left in the queue with a token free", w.db.workspace)
		}
	}
	return nil
}
