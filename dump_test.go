package tenantpg

import (
	"fmt"
	"strings"
	"time"
)

// dumpState describes the budget's internals for a failing test.
func (d *Driver) dumpState() string {
	b := d.b
	b.mu.Lock()
	defer b.mu.Unlock()
	var sb strings.Builder
	now := time.Now()
	fmt.Fprintf(&sb, "open %d waiting %d reapArmed %v dialTime %s\n", b.open, b.waiting, b.reaper.armed, b.dialTime.duration())
	for _, s := range b.servers {
		l := &s.ledger
		fmt.Fprintf(&sb, " server %s limit %d reserved %d shared %d open %d dialing %d inUse %d idle %d closing %d seeking %d\n",
			s.label, l.limit, l.reserved, l.sharedInUse, l.open, l.dialing, l.inUse, l.idle, l.closing, s.queue.len)
		for w := s.queue.front; w != nil; w = s.queue.next(w) {
			fmt.Fprintf(&sb, "  seeker %s age %s claim %v\n", w.db.workspace, now.Sub(w.since), w.claim != nil)
		}
		for x := s.pools.front; x != nil; x = s.pools.next(x) {
			t := &x.tokens
			fmt.Fprintf(&sb, "  pool %s open %d dialing %d inUse %d idle %d closing %d waiters %d seeking %d refs %d listed %v protected %v useTime %s\n",
				x.workspace, t.open, t.dialing, t.inUse, t.idle, t.closing, x.waiters.len, x.waiters.seeking, x.refs, x.lru.listed, x.protected, x.growth.useTime.duration())
		}
	}
	return sb.String()
}

func assertEventually(cond func() bool, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if cond() {
			return true
		}
		time.Sleep(time.Millisecond)
	}
	return cond()
}
