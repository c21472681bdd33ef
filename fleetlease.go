package tenantpg

import "time"

// A server's side of a fleet budget (fleet.go): what its coordinator has
// leased for it, and what it yields to other processes. The coordinator
// calls the budget through fleetSide (budget.go); the changes of limit it
// brings are applied by refreshLimitLocked (limits.go).

// fleetLease is what one server may hold under a fleet budget. Guarded by
// budget.mu; never locks, never blocks, holds no *budget (coord is the
// coordinator, which runs on its own goroutine; poke only wakes it).
type fleetLease struct {
	coord   *fleetCoordinator // nil without a fleet budget
	role    string            // the role whose fleet it is part of
	held    int               // slots leased for backends
	granted bool              // the coordinator has set held at least once: held is a share, not a fallback
	// While other processes need slots the server yields down to cap,
	// until capUntil.
	cap      int
	capUntil time.Time
	floor    int // what it may hold whatever its leases (fleetFloor)
}

// limit returns what a server whose configured budget is budget may hold at
// now: that budget, or with a fleet budget the slots leased for backends,
// within that budget less the coordination session, and within the cap it
// yields to while other processes need slots; never below its floor, which
// only sessions of another role holding the fleet's slots raise.
func (f *fleetLease) limit(budget int, now time.Time) int {
	if f.coord == nil {
		return budget
	}
	l := min(budget-1, f.held)
	if now.Before(f.capUntil) {
		l = min(l, f.cap)
	}
	return max(l, min(f.floor, budget-1), 0)
}

// yieldEnded reports whether a yield has ended by now, and forgets it: the
// server may grow back to the slots it holds. The coordinator asks for the
// need at least once a second, so the cap lasts at most that much longer
// than fleetYieldFor.
func (f *fleetLease) yieldEnded(now time.Time) bool {
	if f.capUntil.IsZero() || now.Before(f.capUntil) {
		return false
	}
	f.capUntil = time.Time{}
	return true
}

// need is how many slots a server whose tokens are l should lease: what it
// holds (closing backends included, as the server still counts them) and
// what dialers (callers that are to dial, less those promised a token)
// want, within its budget less the coordination session and the cap it
// yields to. Reserved tokens a pool does not use are held back from the
// others (ledger.room), so they are leased too, or the share could sit at
// or below the reservations and no other pool could dial.
func (f *fleetLease) need(l *ledger, dialers int, now time.Time) int {
	need := l.open + dialers + l.unusedReserved()
	if now.Before(f.capUntil) {
		need = min(need, max(f.cap, l.open))
	}
	return max(0, min(need, l.max-1))
}

// setHeld records that n slots are leased for backends. Lowering is refused
// while the server holds more than n open.
func (f *fleetLease) setHeld(n, open int) bool {
	if n < open {
		return false
	}
	f.held, f.granted = n, true
	return true
}

// yield caps the server to give up to n slots to other processes: down to
// what its callers use now (busy: backends in use or dialing, and callers
// that are to dial), and no lower than the fair share while they use that
// much. It reports whether there is anything to give.
func (f *fleetLease) yield(n, fair, live, busy int, now time.Time) bool {
	keep := min(busy, max(fair, 1))
	give := min(n, live-keep)
	if give <= 0 {
		return false
	}
	f.cap = live - give
	f.capUntil = now.Add(fleetYieldFor)
	return true
}

// lost falls back to n slots: the coordination session was lost, or is
// back with fewer. A lost session's slots are free for other processes
// until it is back, so only the role's CONNECTION LIMIT holds the cap
// meanwhile: the server falls back to the smaller of its share and n (a
// fair share), the less to overshoot. One never given a share (its
// coordination session has not connected yet) gets n, so that a
// coordination failure is not an outage.
func (f *fleetLease) lost(n int) {
	if f.granted {
		n = min(f.held, n)
	}
	f.held = n
}

// fleetCloseTimeout bounds how long Driver.Close waits for the backends on
// a fleet's server to close (busy ones are closed when they are checked
// in), and then for the coordination session to unlock its slots; past it
// the session is cut, which frees them on the server too.
const fleetCloseTimeout = 5 * time.Second

// fleetYieldFor is how long a process holds to the cap it lowered itself
// to for other processes, as long as a need heard from another counts
// (fleetHeard).
const fleetYieldFor = fleetHeard
