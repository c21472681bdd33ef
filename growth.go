package tenantpg

import (
	"math"
	"time"
)

// The growth rule: whether a pool whose callers wait should dial another
// backend or wait for a busy one.
//
// A pool grows when it has no backend, or when the callers queued on it
// would together wait longer for its busy backends than a dial takes. With
// n backends (dialing ones and those about to be dialed included) serving q
// queued callers, one every u (the pool's average use time) / n, the queue
// costs its callers q(q+1)/2 · u/n in all; a dial costs the driver's
// average dial time (dialCostLocked, checkout.go). A caller that has waited
// as long as a dial costs dials too (budget.impatient): its pool's backends
// are held longer than their average use, or nothing was measured yet.
//
// That judges a burst. Sustained load is judged by what waiting has cost:
// when the waits of the pool's callers, decaying over waitDebtDecay, add up
// to more than a dial, it dials (and the debt is paid).
//
// A hot pool's second backend serving the rare overlaps of short queries
// costs more than it saves under churn, where dials are slow; a pool with
// many callers queued on one backend grows to its cap at once.

// waitDebtDecay is the time constant of a pool's wait debt: callers that
// together wait longer than a dial takes within about this long justify a
// dial. Sustained moderate concurrency (two callers of short queries on one
// backend wait a few dozen microseconds each, tens of thousands of times a
// second) passes it within milliseconds; a hot workspace under churn, whose
// few callers overlap now and then, does not.
const waitDebtDecay = time.Second

// growth is a pool's measure of its load, for the growth rule. Guarded by
// budget.mu; never locks, never blocks, holds no *budget.
type growth struct {
	// useTime is the EWMA of how long a caller holds a backend.
	useTime ewma
	// waitDebt is the time its callers spent waiting for a backend,
	// decaying with waitDebtDecay, in nanoseconds, as of debtAt.
	waitDebt float64
	debtAt   time.Time
}

// used records a caller that held a backend for d.
func (g *growth) used(d time.Duration) { g.useTime.add(d, useTimeAlpha) }

// owe adds a caller's wait for a backend to the debt.
func (g *growth) owe(waited time.Duration, now time.Time) {
	g.decay(now)
	g.waitDebt += float64(waited)
}

// paid clears the debt: a new backend pays for the waits so far.
func (g *growth) paid() { g.waitDebt = 0 }

func (g *growth) decay(now time.Time) {
	if dt := now.Sub(g.debtAt); dt > 0 {
		if g.waitDebt != 0 {
			g.waitDebt *= math.Exp(-float64(dt) / float64(waitDebtDecay))
		}
		g.debtAt = now
	}
}

// shouldDial decides whether a pool with n backends (live, and to be
// dialed) and q callers waiting for one should dial another, within cap,
// when a dial costs cost.
func (g *growth) shouldDial(n, q, cap int, cost time.Duration, now time.Time) bool {
	if n == 0 {
		return true
	}
	if n >= cap || g.useTime == 0 {
		return false // at the cap, or nothing measured yet: the first backend will tell
	}
	qf := float64(q)
	if qf*(qf+1)/2*float64(g.useTime)/float64(n) > float64(cost) {
		return true
	}
	g.decay(now)
	return g.waitDebt > float64(cost)
}
