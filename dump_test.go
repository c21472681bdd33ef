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
	fmt.Fprintf(&sb, "limit %d reserved %d shared %d open %d dialing %d inUse %d idle %d closing %d waiting %d seeking %d reapArmed %v dialTime %s\n",
		b.limit, b.reserved, b.sharedInUse, b.open, b.dialing, b.inUse, b.idle, b.closing, b.waiting, b.queue.len, b.reaper.armed, b.dialTime.duration())
	for w := b.queue.front; w != nil; w = b.queue.next(w) {
		fmt.Fprintf(&sb, "  seeker %s age %s claim %v\n", w.db.workspace, now.Sub(w.since), w.claim != nil)
	}
	for _, x := range b.dbs {
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
