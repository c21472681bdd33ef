package tenantpg

import "time"

// Callers that wait. A checkout that finds no idle backend of its pool
// queues on the pool (poolQueue), for a backend another caller checks in.
// When the pool should grow (growth.go), or the caller has waited as long as
// a dial takes, it also joins its server's dial queue (dialQueue), for a
// token to dial one: whichever comes first serves it. The queues and the
// waiters' fields they touch are guarded by budget.mu; they never lock,
// never block, and hold no *budget.

// waiter is a caller queued for a backend of its pool and, when it is to
// dial one, for a token.
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

	inPool, inDial links[waiter]

	// For its trace, read by its owner once served. Guarded by budget.mu.
	sought  time.Time // when it first joined the dial queue
	evicted string    // workspace of the backend closed for its token
	slotted time.Time // when it got a dial slot, with a free token or a victim closing for it
}

// seeking reports whether w is in its server's dial queue: it is to dial as
// soon as it gets a token, unless a backend of its pool is checked in first.
func (w *waiter) seeking() bool { return w.inDial.listed }

// finish ends w's wait: served (be or tok set) or failed (err set).
func (w *waiter) finish() {
	w.done = true
	close(w.ready)
}

// poolQueue is a pool's callers waiting for a backend, oldest first.
// seeking of them are in the server's dial queue too.
type poolQueue struct {
	list[waiter, waiterInPool]
	seeking int
}

// forBackend is the callers that wait only for a backend of the pool.
func (q *poolQueue) forBackend() int { return q.len - q.seeking }

// dialQueue is a server's callers that are to dial, oldest first. claims
// counts those promised the token of a backend being closed for them: each
// is about to dial and holds a dial slot (pace.go).
type dialQueue struct {
	list[waiter, waiterInDial]
	claims int
}

// join adds w, queued on its pool, to the dial queue.
func (q *dialQueue) join(w *waiter) {
	w.db.waiters.seeking++
	q.pushBack(w)
}

// leave takes w out of the dial queue, dropping its claim; it stays queued
// on its pool.
func (q *dialQueue) leave(w *waiter) {
	w.db.waiters.seeking--
	q.remove(w)
	q.dropClaim(w)
}

// promise gives w, which is in the queue, the token t of a backend being
// closed: w gets it when it returns.
func (q *dialQueue) promise(w *waiter, t *token) {
	t.claim = w
	w.claim = t
	q.claims++
}

// dropClaim takes back the token w was promised, if any.
func (q *dialQueue) dropClaim(w *waiter) {
	if w.claim != nil {
		w.claim.claim = nil
		w.claim = nil
		q.claims--
	}
}

type waiterInPool struct{}

func (waiterInPool) links(w *waiter) *links[waiter] { return &w.inPool }

type waiterInDial struct{}

func (waiterInDial) links(w *waiter) *links[waiter] { return &w.inDial }
