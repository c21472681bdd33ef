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
// the fastest dial seen, drifting up slowly towards slower ones, so that a
// server that became slower for good is not paced to one dial forever. It
// never exceeds the budget.

// initialDialSlots is the number of dials at once before any is measured.
const initialDialSlots = 4

// paceBaseDrift is how slowly the baseline follows dials slower than it:
// 1/64 of the difference per dial.
const paceBaseDrift = 64

// pacer is the budget's dial pacing state; guarded by budget.mu.
type pacer struct {
	slots int           // dials allowed at once, claims included
	base  time.Duration // the baseline dial time; 0 before the first dial
	good  int           // dials near the baseline since slots last changed
	epoch uint64        // counts the cuts
}

// dialed adjusts the slots after a successful dial of t that took took.
func (p *pacer) dialed(t *token, took time.Duration, limit int) {
	if p.base == 0 || took < p.base {
		p.base = took
	} else {
		p.base += (took - p.base) / paceBaseDrift
	}
	switch {
	case took > 2*p.base:
		if t.paceEpoch == p.epoch {
			p.slots = max(1, min(p.slots, limit)/2)
			p.epoch++
			p.good = 0
		}
	case 2*took <= 3*p.base:
		if p.good++; p.good >= p.slots {
			p.good = 0
			if p.slots < limit {
				p.slots++
			}
		}
	}
}

// dialSlotFreeLocked reports whether another caller may start a dial, or
// an eviction for one.
func (b *budget) dialSlotFreeLocked() bool {
	return b.dialing+b.claims < min(b.pace.slots, b.limit)
}

// dropClaimLocked takes back the token w was promised, if any.
func (b *budget) dropClaimLocked(w *waiter) {
	if w.claim != nil {
		w.claim.claim = nil
		w.claim = nil
		b.claims--
	}
}
