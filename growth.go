package tenantpg

import (
	"math"
	"time"
)

// waitDebtDecay is the time constant of a database's wait debt: callers that
// together wait longer than a dial takes within about this long justify a
// dial. Sustained moderate concurrency (two callers of short queries on one
// backend wait a few dozen microseconds each, tens of thousands of times a
// second) passes it within milliseconds; a hot workspace under churn, whose
// few callers overlap now and then, does not.
const waitDebtDecay = time.Second

// owe adds a caller's wait to d's wait debt; guarded by budget.mu.
func (d *backendPool) owe(waited time.Duration, now time.Time) {
	d.decayDebt(now)
	d.waitDebt += float64(waited)
}

func (d *backendPool) decayDebt(now time.Time) {
	if dt := now.Sub(d.debtAt); dt > 0 {
		if d.waitDebt != 0 {
			d.waitDebt *= math.Exp(-float64(dt) / float64(waitDebtDecay))
		}
		d.debtAt = now
	}
}

// shouldDialLocked decides whether d's pool should grow by a backend: when
// it has none, or when the callers queued on it would together wait longer
// for its busy backends than a dial takes. With n backends (dialing ones
// and those about to be dialed included) serving q queued callers, one
// every u (the database's average use time) / n, the queue costs its
// callers q(q+1)/2 · u/n in all; a dial costs the driver's average dial
// time (dialCostLocked). A caller that has waited as long as a dial costs
// dials too (budget.impatient): its database's backends are held longer
// than their average use, or nothing was measured yet.
//
// That judges a burst. Sustained load is judged by what waiting has cost:
// when the waits of d's callers, decaying over waitDebtDecay, add up to more
// than a dial, d dials (and the debt is paid).
//
// A hot database's second backend serving the rare overlaps of short
// queries costs more than it saves under churn, where dials are slow; a
// database with many callers queued on one backend grows to its cap at once.
func (b *budget) shouldDialLocked(d *backendPool, now time.Time) bool {
	n := d.open - d.closing + d.seeking
	if n == 0 {
		return true
	}
	if n >= b.capLocked(d) || d.useTime == 0 {
		return false // at the cap, or nothing measured yet: the first backend will tell
	}
	cost := float64(b.dialCostLocked(d))
	q := float64(d.waiters.len - d.seeking)
	if q*(q+1)/2*float64(d.useTime)/float64(n) > cost {
		return true
	}
	d.decayDebt(now)
	return d.waitDebt > cost
}

// dialCostLocked is what a new backend for d costs: the average dial time,
// twice that when the budget is full and the dial evicts another database's
// backend, which that database is likely to dial again (for growth only a
// spare one, of a database that keeps another: lru.go).
func (b *budget) dialCostLocked(d *backendPool) time.Duration {
	if !b.roomLocked(d) {
		return 2 * b.dialTime.duration()
	}
	return b.dialTime.duration()
}
