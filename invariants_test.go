package tenantpg

import "fmt"

// checkInvariantsLocked checks the budget's bookkeeping against itself: the
// counters against the lists, the pools, the backends and the waiters. It
// is the shared invariant of the state-machine fuzz test and of every
// server test at quiescence. It returns the first violation found.
func (b *budget) checkInvariantsLocked() error {
	var open, waiting int
	for _, s := range b.servers {
		if s.pools.len == 0 && s.lease.coord == nil {
			return fmt.Errorf("server %s kept with no pool and no fleet lease", s.label)
		}
		for p := s.pools.front; p != nil; p = s.pools.next(p) {
			if p.srv != s {
				return fmt.Errorf("pool %q in the list of server %s, not its own", p.workspace, s.label)
			}
			if err := b.checkPoolLocked(p); err != nil {
				return fmt.Errorf("pool %q: %w", p.workspace, err)
			}
			open += p.tokens.open
			waiting += p.waiters.len
		}
		if err := b.checkServerLocked(s); err != nil {
			return fmt.Errorf("server %s: %w", s.label, err)
		}
	}
	switch {
	case open != b.open:
		return fmt.Errorf("budget open %d != sum over pools %d", b.open, open)
	case waiting != b.waiting:
		return fmt.Errorf("%d callers waiting, pools queue %d", b.waiting, waiting)
	case b.peakOpen < b.open:
		return fmt.Errorf("peak %d below open %d", b.peakOpen, b.open)
	}
	for be := b.watch.watched.front; be != nil; be = b.watch.watched.next(be) {
		if be.state != backendBusy || be.leaked {
			return fmt.Errorf("a backend of %q watched for leaks in state %d, reported %v", be.db.workspace, be.state, be.leaked)
		}
	}
	if b.watch.watched.len > 0 && !b.watch.timer.armed && !b.closed {
		return fmt.Errorf("%d backends watched for leaks and no check armed", b.watch.watched.len)
	}
	if b.strays.count < 0 {
		return fmt.Errorf("strays %d", b.strays.count)
	}
	return nil
}

// checkPoolLocked checks one pool's lists against its counts.
func (b *budget) checkPoolLocked(p *backendPool) error {
	t := &p.tokens
	switch {
	case p.waiters.seeking < 0 || p.refs < 0:
		return fmt.Errorf("a negative count: seeking %d refs %d", p.waiters.seeking, p.refs)
	case p.refs == 0 && t.open == 0:
		return fmt.Errorf("nothing uses it, no backend, and not forgotten")
	case t.idle != p.idleBackends.len || t.inUse != p.busy.len:
		return fmt.Errorf("idle %d inUse %d but %d idle and %d busy backends listed", t.idle, t.inUse, p.idleBackends.len, p.busy.len)
	case t.idle > 0 && p.waiters.len > 0:
		return fmt.Errorf("%d idle backends while %d callers wait for one", t.idle, p.waiters.len)
	case (t.idle > 0) != p.lru.listed:
		return fmt.Errorf("idle %d, in the recency list %v", t.idle, p.lru.listed)
	case t.live() > b.capLocked(p) && !b.closed && t.idle > 0:
		return fmt.Errorf("%d live backends over its cap %d with one idle", t.live(), b.capLocked(p))
	case p.protected && t.open == 0:
		return fmt.Errorf("protected without a backend")
	}
	for be := p.idleBackends.front; be != nil; be = p.idleBackends.next(be) {
		if be.state != backendIdle || be.db != p {
			return fmt.Errorf("a backend in state %d in its idle list", be.state)
		}
		if n := p.idleBackends.next(be); n != nil && n.idleSince.After(be.idleSince) {
			return fmt.Errorf("idle list out of check-in order")
		}
	}
	for be := p.busy.front; be != nil; be = p.busy.next(be) {
		if be.state != backendBusy || be.db != p {
			return fmt.Errorf("a backend in state %d in its busy list", be.state)
		}
		if n := p.busy.next(be); n != nil && n.checkedOut.Before(be.checkedOut) {
			return fmt.Errorf("busy list out of checkout order")
		}
	}
	seeking := 0
	for w := p.waiters.front; w != nil; w = p.waiters.next(w) {
		if w.db != p || w.done {
			return fmt.Errorf("a served or foreign waiter queued")
		}
		if w.seeking() != p.srv.queue.contains(w) {
			return fmt.Errorf("a waiter seeking %v, in its server's queue %v", w.seeking(), p.srv.queue.contains(w))
		}
		if w.seeking() {
			seeking++
		}
	}
	if seeking != p.waiters.seeking {
		return fmt.Errorf("seeking %d, %d waiters seeking", p.waiters.seeking, seeking)
	}
	if c := &p.srv.circuit; c.down {
		// Its callers wait for the server's probe, not for a dial of their
		// own; only the probe's caller seeks a token.
		if p.waiters.len > 0 && t.live() == 0 && !c.probing && !c.wake.armed && !b.closed {
			return fmt.Errorf("%d callers wait on server %s, down, with no probe under way or scheduled", p.waiters.len, p.srv.label)
		}
		for w := p.waiters.front; w != nil; w = p.waiters.next(w) {
			if w.seeking() && w != c.prober {
				return fmt.Errorf("a caller seeks a token while server %s is down and it is not the probe", p.srv.label)
			}
		}
	} else if p.waiters.len > 0 && t.live()+p.waiters.seeking == 0 {
		return fmt.Errorf("%d callers wait and no backend is there or to be dialed", p.waiters.len)
	}
	return nil
}

// checkServerLocked checks one server's ledger, queues, eviction order and
// circuit against its pools.
func (b *budget) checkServerLocked(s *server) error {
	var counts []*tokenCounts
	var seeking, waiting, idlePools, protectedOpen int
	for p := s.pools.front; p != nil; p = s.pools.next(p) {
		counts = append(counts, &p.tokens)
		seeking += p.waiters.seeking
		waiting += p.waiters.len
		if p.lru.listed {
			idlePools++
		}
		if p.protected {
			protectedOpen += p.tokens.open
		}
	}
	if err := s.ledger.check(counts); err != nil {
		return err
	}
	l, r, c := &s.ledger, &s.recency, &s.circuit
	switch {
	case idlePools != r.probation.len+r.protected.len:
		return fmt.Errorf("%d pools in the recency lists, %d listed as idle", r.probation.len+r.protected.len, idlePools)
	case protectedOpen != r.protectedOpen:
		return fmt.Errorf("protectedOpen %d, but protected pools hold %d", r.protectedOpen, protectedOpen)
	case seeking != s.queue.len:
		return fmt.Errorf("%d callers in its queue, pools count %d seeking", s.queue.len, seeking)
	case waiting != s.waiting:
		return fmt.Errorf("%d callers waiting, pools queue %d", s.waiting, waiting)
	case l.open > l.limit && l.sharedOver() && r.victim() != nil && !b.closed:
		return fmt.Errorf("open %d over the budget %d with an idle shared backend left", l.open, l.limit)
	case !c.down && (c.probing || c.prober != nil):
		return fmt.Errorf("up with a probe under way")
	case c.prober != nil && (!c.probing || !c.prober.seeking() || c.prober.db.srv != s):
		return fmt.Errorf("its probe's caller is not seeking a token")
	}
	for x := r.probation.front; x != nil; x = r.probation.next(x) {
		if x.protected {
			return fmt.Errorf("protected pool %q on probation", x.workspace)
		}
	}
	for x := r.protected.front; x != nil; x = r.protected.next(x) {
		if !x.protected {
			return fmt.Errorf("pool %q on probation in the protected list", x.workspace)
		}
	}
	// The spare lists are the segments' pools that hold two live backends
	// or more, in the segments' order.
	for _, seg := range [2]struct {
		l     *list[backendPool, poolInRecency]
		spare *list[backendPool, poolSpare]
	}{{&r.probation, &r.spareProbation}, {&r.protected, &r.spareProtected}} {
		y, n := seg.spare.front, 0
		for x := seg.l.front; x != nil; x = seg.l.next(x) {
			if !hasSpare(x) {
				if x.spare.listed {
					return fmt.Errorf("pool %q in a spare list with %d live backends", x.workspace, x.tokens.live())
				}
				continue
			}
			if y != x {
				return fmt.Errorf("pool %q, %d live backends with one idle, not next in its spare list", x.workspace, x.tokens.live())
			}
			y = seg.spare.next(y)
			n++
		}
		if n != seg.spare.len {
			return fmt.Errorf("%d pools in a spare list, %d in its segment with a spare backend", seg.spare.len, n)
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
	if claims != s.queue.claims {
		return fmt.Errorf("%d waiters hold a claim; the server counts %d", claims, s.queue.claims)
	}
	for w := s.queue.front; w != nil; w = s.queue.next(w) {
		if w.claim != nil && w.claim.claim != w {
			return fmt.Errorf("a waiter of %q claims a token promised elsewhere", w.db.workspace)
		}
		// Paced: a waiter without a claim may wait for a dial slot.
		if w.claim == nil && !b.closed && w.db.room() && w.db.tokens.live() < b.capLocked(w.db) && s.dialSlotFree() {
			return fmt.Errorf("a waiter of %q left in the queue with a token free", w.db.workspace)
		}
	}
	return nil
}

// poolsLocked returns every pool the budget keeps state for.
func (b *budget) poolsLocked() []*backendPool {
	var out []*backendPool
	for _, s := range b.servers {
		for p := s.pools.front; p != nil; p = s.pools.next(p) {
			out = append(out, p)
		}
	}
	return out
}

// keepsLocked reports whether the budget keeps p's state: p is not
// forgotten.
func (b *budget) keepsLocked(p *backendPool) bool {
	return p.srv != nil && p.onServer.listed && b.servers[p.srv.key] == p.srv
}
