package tenantpg

import "fmt"

// The ledger: one server's tokens, counted by what their backends do, and
// the rules those counts obey.
//
// A token stands for one backend: it is taken before a dial starts and
// given back only after the server has closed that backend's socket, so the
// server never sees more connections than the budget. Each server has its
// own budget (its max_connections is its own), so a token of one never pays
// for a backend of another.
//
// A pool may set aside reserved tokens that only it can use; the rest are
// shared. A pool's tokens count against its reservation first, so
// sharedInUse == Σ max(0, pool.open - pool.reserved). Tokens of backends
// being closed still count, as they still count on the server; sharedLive
// leaves them out, to tell whether the shared tokens are over a lowered
// limit once those are gone.
//
// A token moves through the states of its backend: taken for a dial
// (dialing), then in use, idle and in use again, then closing, then given
// back; a failed dial goes from dialing to closing. Each move is one method
// here, which keeps the pool's counts, the server's and the shared sums in
// step.

// tokenCounts are the tokens one pool holds, by what their backends do.
// Guarded by budget.mu.
type tokenCounts struct {
	reserved int // pool_reserved_conns: tokens of its server only it may use
	open     int // dialing + inUse + idle + closing
	dialing  int
	inUse    int
	idle     int
	closing  int // their backends are being torn down
}

// live is the tokens whose backends are not being closed.
func (t *tokenCounts) live() int { return t.open - t.closing }

// liveShared is the pool's part of its server's sharedLive.
func (t *tokenCounts) liveShared() int { return max(0, t.open-t.closing-t.reserved) }

// ledger is one server's budget of tokens. Guarded by budget.mu; never
// locks, never blocks, holds no *budget.
type ledger struct {
	// max is the budget as configured: Config.MaxConnections or the
	// server's ServerMaxConnections figure. limit is what it may hold now:
	// max, or with a fleet budget what its lease allows (fleetlease.go).
	max, limit int

	reserved    int // Σ pool reserved
	sharedInUse int // tokens held beyond reservations
	sharedLive  int // Σ pool liveShared
	open        int // tokens held: dialing, in use, idle or closing
	dialing     int
	inUse       int
	idle        int
	closing     int
	peakOpen    int
}

// take counts a new token of p, for a dial.
func (l *ledger) take(p *tokenCounts) {
	old := p.liveShared()
	p.open++
	p.dialing++
	if p.open > p.reserved {
		l.sharedInUse++
	}
	l.sharedLive += p.liveShared() - old
	l.open++
	l.dialing++
	l.peakOpen = max(l.peakOpen, l.open)
}

// dialed moves a token of p from its dial to the caller that dialed it.
func (l *ledger) dialed(p *tokenCounts) {
	p.dialing--
	l.dialing--
	p.inUse++
	l.inUse++
}

// park moves a token of p from a caller to its idle list.
func (l *ledger) park(p *tokenCounts) {
	p.inUse--
	l.inUse--
	p.idle++
	l.idle++
}

// reuse moves a token of p from its idle list to a caller.
func (l *ledger) reuse(p *tokenCounts) {
	p.idle--
	l.idle--
	p.inUse++
	l.inUse++
}

// close moves a token of p whose backend was in state from (dialing, busy
// or idle) to closing: it still counts, and no longer lives.
func (l *ledger) close(p *tokenCounts, from backendState) {
	old := p.liveShared()
	l.leave(p, from)
	p.closing++
	l.closing++
	l.sharedLive += p.liveShared() - old
}

// give takes back a token of p whose backend was in state from: closing
// (the server closed it) or dialing (it was granted and never dialed).
func (l *ledger) give(p *tokenCounts, from backendState) {
	if p.open > p.reserved {
		l.sharedInUse--
	}
	old := p.liveShared()
	l.leave(p, from)
	p.open--
	l.open--
	l.sharedLive += p.liveShared() - old
}

// leave uncounts a token of p from state.
func (l *ledger) leave(p *tokenCounts, state backendState) {
	switch state {
	case backendDialing:
		p.dialing--
		l.dialing--
	case backendBusy:
		p.inUse--
		l.inUse--
	case backendIdle:
		p.idle--
		l.idle--
	case backendClosing:
		p.closing--
		l.closing--
	}
}

// reserve sets aside n tokens for p; p holds none yet.
func (l *ledger) reserve(p *tokenCounts, n int) {
	l.reserved += n
	p.reserved = n
}

// unreserve gives p's reservation back to the shared tokens; p holds none.
func (l *ledger) unreserve(p *tokenCounts) {
	l.reserved -= p.reserved
	p.reserved = 0
}

// room reports whether p may take a token now without a backend closing
// for it.
func (l *ledger) room(p *tokenCounts) bool {
	return l.open < l.limit && (p.open < p.reserved || l.sharedInUse < l.limit-l.reserved)
}

// sharedOver reports whether the live shared tokens are over what the limit
// leaves beyond the reservations: a limit was lowered.
func (l *ledger) sharedOver() bool { return l.sharedLive > l.limit-l.reserved }

// over reports whether p holds more live backends than its cap, or shared
// ones while the shared tokens are over the limit: both after a limit was
// lowered.
func (l *ledger) over(p *tokenCounts, cap int) bool {
	live := p.live()
	return live > cap || live > p.reserved && l.sharedOver()
}

// unusedReserved is the reserved tokens their pools do not hold.
func (l *ledger) unusedReserved() int { return l.reserved - (l.open - l.sharedInUse) }

// check verifies the ledger against the counts of its pools: the sums, and
// each pool's own.
func (l *ledger) check(pools []*tokenCounts) error {
	var sum ledger
	for _, p := range pools {
		if p.open != p.dialing+p.inUse+p.idle+p.closing {
			return fmt.Errorf("a pool's open %d != dialing %d + inUse %d + idle %d + closing %d",
				p.open, p.dialing, p.inUse, p.idle, p.closing)
		}
		if p.open < 0 || p.dialing < 0 || p.inUse < 0 || p.idle < 0 || p.closing < 0 || p.reserved < 0 {
			return fmt.Errorf("a pool's negative count: %+v", *p)
		}
		sum.open += p.open
		sum.dialing += p.dialing
		sum.inUse += p.inUse
		sum.idle += p.idle
		sum.closing += p.closing
		sum.reserved += p.reserved
		sum.sharedInUse += max(0, p.open-p.reserved)
		sum.sharedLive += p.liveShared()
	}
	switch {
	case sum.open != l.open || sum.dialing != l.dialing || sum.inUse != l.inUse || sum.idle != l.idle || sum.closing != l.closing:
		return fmt.Errorf("counts (open %d dialing %d inUse %d idle %d closing %d) != sums over its pools (%d %d %d %d %d)",
			l.open, l.dialing, l.inUse, l.idle, l.closing, sum.open, sum.dialing, sum.inUse, sum.idle, sum.closing)
	case sum.sharedInUse != l.sharedInUse:
		return fmt.Errorf("sharedInUse %d, but pools hold %d beyond their reservations", l.sharedInUse, sum.sharedInUse)
	case sum.sharedLive != l.sharedLive:
		return fmt.Errorf("sharedLive %d, but pools hold %d live beyond their reservations", l.sharedLive, sum.sharedLive)
	case sum.reserved != l.reserved:
		return fmt.Errorf("reserved %d, but pools reserve %d", l.reserved, sum.reserved)
	case l.peakOpen < l.open:
		return fmt.Errorf("peak %d below open %d", l.peakOpen, l.open)
	}
	return nil
}
