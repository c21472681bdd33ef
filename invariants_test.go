package tenantpg

import "fmt"

// checkInvariantsLocked checks the budget's bookkeeping against itself: the
// counters against the lists, the databases, the backends and the waiters.
// It is the shared invariant of the state-machine fuzz test and of every
// server test at quiescence. It returns the first violation found.
func (b *budget) checkInvariantsLocked() error {
	var open, dialing, inUse, idle, closing, shared, live, reserved, waiting, seeking, idleDBs, protectedOpen int
	servers := map[*server]int{}
	for k, d := range b.dbs {
		if d.key != k {
			return fmt.Errorf("database %q filed under another key", d.workspace)
		}
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
			if w.seekingLocked() != b.queue.contains(w) {
				return fmt.Errorf("database %q: a waiter seeking %v, in the budget's queue %v", d.workspace, w.seekingLocked(), b.queue.contains(w))
			}
			if w.seekingLocked() {
				dbSeeking++
			}
		}
		if dbSeeking != d.seeking {
			return fmt.Errorf("database %q: seeking %d, %d waiters seeking", d.workspace, d.seeking, dbSeeking)
		}
		if d.srv == nil || b.servers[serverKey{host: k.host, port: k.port}] != d.srv {
			return fmt.Errorf("database %q: not on the circuit of its server", d.workspace)
		}
		servers[d.srv]++
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
		dialing += d.dialing
		inUse += d.inUse
		idle += d.idle
		closing += d.closing
		shared += max(0, d.open-d.reserved)
		live += liveShared(d)
		reserved += d.reserved
		waiting += d.waiters.len
		seeking += d.seeking
		if d.lru.listed {
			idleDBs++
		}
		if d.protected {
			protectedOpen += d.open
			if d.open == 0 {
				return fmt.Errorf("database %q protected without a backend", d.workspace)
			}
		}
	}
	switch {
	case open != b.open || dialing != b.dialing || inUse != b.inUse || idle != b.idle || closing != b.closing:
		return fmt.Errorf("budget counters (open %d dialing %d inUse %d idle %d closing %d) != sum over databases (%d %d %d %d %d)",
			b.open, b.dialing, b.inUse, b.idle, b.closing, open, dialing, inUse, idle, closing)
	case shared != b.sharedInUse:
		return fmt.Errorf("sharedInUse %d, but databases hold %d beyond their reservations", b.sharedInUse, shared)
	case live != b.sharedLive:
		return fmt.Errorf("sharedLive %d, but databases hold %d live beyond their reservations", b.sharedLive, live)
	case reserved != b.reserved:
		return fmt.Errorf("reserved %d, but databases reserve %d", b.reserved, reserved)
	case idleDBs != b.recency.probation.len+b.recency.protected.len:
		return fmt.Errorf("%d databases in the recency lists, %d listed as idle", b.recency.probation.len+b.recency.protected.len, idleDBs)
	case protectedOpen != b.recency.protectedOpen:
		return fmt.Errorf("protectedOpen %d, but protected databases hold %d", b.recency.protectedOpen, protectedOpen)
	case waiting != b.waiting:
		return fmt.Errorf("%d callers waiting, databases queue %d", b.waiting, waiting)
	case seeking != b.queue.len:
		return fmt.Errorf("%d callers in the budget's queue, databases count %d seeking", b.queue.len, seeking)
	case b.peakOpen < b.open:
		return fmt.Errorf("peak %d below open %d", b.peakOpen, b.open)
	case b.open > b.limit && b.sharedLive > b.limit-b.reserved && b.recency.victimLocked(b) != nil && !b.closed:
		return fmt.Errorf("open %d over the budget %d with an idle shared backend left", b.open, b.limit)
	}
	if len(servers) != len(b.servers) {
		return fmt.Errorf("%d circuits, databases are on %d servers", len(b.servers), len(servers))
	}
	for s, n := range servers {
		switch {
		case s.refs != n:
			return fmt.Errorf("server %s: %d references, %d databases on it", s.label, s.refs, n)
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
	for x := b.recency.probation.front; x != nil; x = b.recency.probation.next(x) {
		if x.protected {
			return fmt.Errorf("protected database %q on probation", x.workspace)
		}
	}
	for x := b.recency.protected.front; x != nil; x = b.recency.protected.next(x) {
		if !x.protected {
			return fmt.Errorf("database %q on probation in the protected list", x.workspace)
		}
	}
	claims := 0
	for w := b.queue.front; w != nil; w = b.queue.next(w) {
		if w.claim != nil {
			claims++
		}
	}
	if claims != b.claims {
		return fmt.Errorf("%d waiters hold a claim; the budget counts %d", claims, b.claims)
	}
	for w := b.queue.front; w != nil; w = b.queue.next(w) {
		if w.claim != nil && w.claim.claim != w {
			return fmt.Errorf("a waiter of %q claims a token promised elsewhere", w.db.workspace)
		}
		// Paced: a waiter without a claim may wait for a dial slot.
		if w.claim == nil && !b.closed && b.roomLocked(w.db) && w.db.open-w.db.closing < b.capLocked(w.db) && b.dialSlotFreeLocked() {
			return fmt.Errorf("a waiter of %q left in the queue with a token free", w.db.workspace)
		}
	}
	return nil
}
