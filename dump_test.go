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
		fmt.Fprintf(&sb, " server %s limit %d reserved %d shared %d open %d dialing %d inUse %d idle %d closing %d seeking %d\n",
			s.label, s.limit, s.reserved, s.sharedInUse, s.open, s.dialing, s.inUse, s.idle, s.closing, s.queue.len)
		for w := s.queue.front; w != nil; w = s.queue.next(w) {
			fmt.Fprintf(&sb, "  seeker %s age %s claim %v\n", w.db.workspace, now.Sub(w.since), w.claim != nil)
		}
	}
	for x := range b.dbs {
		fmt.Fprintf(&sb, "  db %s open %d dialing %d inUse %d idle %d closing %d waiters %d seeking %d refs %d listed %v protected %v useTime %s\n",
			x.workspace, x.open, x.dialing, x.inUse, x.idle, x.closing, x.waiters.len, x.seeking, x.refs, x.lru.listed, x.protected, x.useTime.duration())
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
