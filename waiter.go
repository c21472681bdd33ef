package tenantpg

import "time"

// waiter is a caller queued for a backend of its database and, when it is
// to dial one, for a token.
type waiter struct {
	db    *backendPool
	since time.Time
	ready chan struct{} // closed once served (be or tok set) or failed (err set)
	stack []uintptr     // the caller's stack, for the backend it gets (leak detection); nil when off

	// Guarded by budget.mu.
	done  bool     // out of the queues: served, failed or given up
	be    *backend // served with a backend another caller checked in
	tok   *token   // served with a token: dial
	err   error
	claim *token // a closing backend's token promised to this waiter
	// patience fires when the waiter has waited as long as a dial takes:
	// waiting has then cost more than dialing would have.
	patience timer

	inDB, inBudget links[waiter]

	// For its trace, read by its owner once served. Guarded by mu.
	sought  time.Time // when it first joined the budget's queue
	evicted string    // workspace of the backend closed for its token
	slotted time.Time // when it got a dial slot, with a free token or a victim closing for it
}

// seekingLocked reports whether w is in the budget's queue: it is to dial
// as soon as it gets a token, unless a backend of its database is checked
// in first.
func (w *waiter) seekingLocked() bool { return w.inBudget.listed }

type waiterInDBQueue struct{}

func (waiterInDBQueue) links(w *waiter) *links[waiter] { return &w.inDB }

type waiterInBudgetQueue struct{}

func (waiterInBudgetQueue) links(w *waiter) *links[waiter] { return &w.inBudget }
