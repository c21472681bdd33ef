package tenantpg

import "time"

// Dial pacing. A miss costs the server a fork and an authentication, and
// dials started together share the server's cores: 32 callers dialing at
// once each wait ~40ms instead of a few, and each holds a token (having
// evicted a cached backend for it) all that time, so the cache shrinks to
// what is not in flight. A caller that must dial therefore first waits for
// a dial slot, in the budget's queue, holding no token and evicting
// nothing; its victim is chosen when its dial can start
// (serveQueueLocked).
//
// The number of slots adapts to the server, AIMD on measured dial time: it
// starts at initialDialSlots, grows by one after a slot's worth of dials
// that took at most 1.5x the baseline, and halves when a dial takes more
// than twice the baseline, at most once per round of dials (a dial granted
// before the last cut says nothing about the new count). The baseline is
// the fastest dial of the last one to two paceWindows (BBR's minimum RTT,
// over a short window): the fastest dial ever seen came from a quiet
// moment, and against it every dial under load looked slow and pinned the
// pacing to one dial at a time (measured: 0.9 dials under way on average,
// 97 dials/s against 222 unpaced). It never exceeds the budget, nor falls
// below minDialSlots. On the harness's runs the dials and claims under way
// stayed near the floor (about 2.5 dialing and 1.5 closing with a floor of
// 4), which suggests the cuts hold it there on a loaded machine: the floor
// decides, and the AIMD lets a server whose dials stay fast take more.

// initialDialSlots is the number of dials at once before any is measured.
const initialDialSlots = 4

// paceWindow is the span over which the baseline is the fastest dial.
const paceWindow = time.Second

// minDialSlots is the fewest dials at once the pacing allows, the initial
// count: on the harness's W=400 Zipf run (2 cores, server on the same
// machine) a floor of 2 measured 1.56x PgBouncer with a p99 1.34x
// PgBouncer's (callers queued for a slot), a floor of 4 1.67x and 0.77x,
// a floor of 8 1.39x and 1.34x (one run each; BENCHMARKS.md).
const minDialSlots = initialDialSlots

// pacer is a server's dial pacing state. Guarded by budget.mu; never
// locks, never blocks, holds no *budget. A dial may start while
// server.dialSlotFree.
type pacer struct {
	slots int    // dials allowed at once, claims included
	good  int    // dials near the baseline since slots last changed
	epoch uint64 // counts the cuts
	// The fastest dial of the window that started at winStart, and of the
	// window before it (0: none).
	winStart        time.Time
	winMin, prevMin time.Duration
}

// dialed adjusts the slots after a successful dial that took took, granted
// in the pacer's epoch epoch, within a budget of limit.
func (p *pacer) dialed(epoch uint64, took time.Duration, limit int, now time.Time) {
	switch since := now.Sub(p.winStart); {
	case since >= 2*paceWindow:
		p.winStart, p.winMin, p.prevMin = now, took, 0
	case since >= paceWindow:
		p.winStart, p.winMin, p.prevMin = now, took, p.winMin
	default:
		p.winMin = min(p.winMin, took)
	}
	base := p.winMin
	if p.prevMin > 0 {
		base = min(base, p.prevMin)
	}
	switch {
	case took > 2*base:
		if epoch == p.epoch { // a dial granted before the last cut says nothing of the new count
			p.slots = max(minDialSlots, min(p.slots, limit)/2)
			p.epoch++
			p.good = 0
		}
	case 2*took <= 3*base:
		if p.good++; p.good >= p.slots {
			p.good = 0
			if p.slots < limit {
				p.slots++
			}
		}
	}
}
