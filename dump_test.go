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
	fmt.Fprintf(&sb, "limit %d reserved %d shared %d open %d dialing %d inUse %d idle %d closing %d waiters %d graceArmed %v(%s) reapArmed %v\n",
		b.limit, b.reserved, b.sharedInUse, b.open, b.dialing, b.inUse, b.idle, b.closing, b.waiters.len, b.graceEnded.armed, b.graceEnded.at.Sub(now), b.reaper.armed)
	for w := b.waiters.front; w != nil; w = b.waiters.next(w) {
		fmt.Fprintf(&sb, "  waiter %s age %s claim %v granted %v\n", w.db.workspace, now.Sub(w.since), w.claim != nil, w.granted)
	}
	for _, x := range b.dbs {
		fmt.Fprintf(&sb, "  db %s open %d dialing %d inUse %d idle %d closing %d listed %v protected %v\n", x.workspace, x.open, x.dialing, x.inUse, x.idle, x.closing, x.lru.listed, x.protected)
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
