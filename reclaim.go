package tenantpg

import (
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// Reclaiming what a closed *sql.DB abandoned, and finding leaks.
//
// A *sql.Rows or *sql.Conn that is never closed keeps its handle checked
// out, and the handle its backend and token. database/sql keeps every
// connection reachable from its DB while the DB is open, so a leaked handle
// cannot be told from a slow reader then. Once the application has closed
// the *sql.DB and dropped it and the leaked Rows or Conn, the handle is
// garbage: a cleanup (runtime.AddCleanup) attached to it closes its backend
// through the budget (eviction reason abandoned) and gives the token back.
//
// The cleanup must not keep the handle alive, so it gets the handle's hold,
// a small cell the handle owns: the budget's state it retained and the
// backend it has checked out. The budget holds backends, never handles.
//
// A PoolConn dropped without Release is reclaimed the same way, with a hold
// of its own. Nothing else keeps a PoolConn reachable, so it is reclaimed
// whether or not its Pool is still open; it is no stray, and a waiting
// caller does not trigger a collection for it: the next cycle the
// application's own allocation brings finds it.
//
// The collector finds such a handle at its next cycle. A caller that waits
// while handles of closed *sql.DBs are still open (budget.strays) triggers
// a cycle, at most once a second, so that reclaiming does not depend on
// how much the application allocates.

// hold is a handle's claim on the budget, apart from the handle so that the
// cleanup of a handle that became garbage can return it.
type hold struct {
	b   *budget
	db  *backendPool // whose state the handle keeps alive; nil for a router's handle and a PoolConn
	own *owner       // the connector or router that made the handle; nil for Driver.Open's and a PoolConn
	// be is the backend the handle has checked out, nil between checkouts.
	// The handle sets it at checkout and takes it back at check-in; the
	// cleanup takes it only if the handle never did. Atomic because the
	// cleanup runs on a goroutine of its own.
	be atomic.Pointer[backend]
}

// newHandle returns a handle of cn's database, or of r's workspaces,
// counted for own; it fails once the driver is closed.
func newHandle(b *budget, cn *connector, r *router, own *owner) (*conn, error) {
	h := &hold{b: b, own: own}
	if cn != nil {
		h.db = cn.db
	}
	if err := b.retain(h.db, own); err != nil {
		return nil, err
	}
	c := &conn{b: b, fixed: cn, router: r, hold: h}
	c.cleanup = runtime.AddCleanup(c, reclaim, h)
	return c, nil
}

// reclaim is the cleanup of a handle that became garbage without being
// closed: it closes the backend the handle still held and releases what the
// handle retained. It runs once, on the runtime's cleanup goroutine; Close
// cancels it.
func reclaim(h *hold) {
	if be := h.be.Swap(nil); be != nil {
		h.b.abandon(be)
	}
	h.b.release(h.db, h.own)
}

// leakStackDepth bounds the frames kept for a checkout's stack: enough for
// database/sql's own frames, an ORM's and the application's caller.
const leakStackDepth = 32

// captureStack returns the stack of the caller of its caller, the code
// that checks a backend out, when leak detection is on; nil otherwise. The
// program counters are symbolized only when a leak is logged.
func (b *budget) captureStack() []uintptr {
	if b.leakThreshold.Load() <= 0 {
		return nil
	}
	pcs := make([]uintptr, leakStackDepth)
	return pcs[:runtime.Callers(3, pcs)]
}

// formatStack renders program counters as a Go stack trace does: one
// function per line, then its file and line.
func formatStack(pcs []uintptr) string {
	var sb strings.Builder
	frames := runtime.CallersFrames(pcs)
	for {
		f, more := frames.Next()
		if f.Function != "" {
			sb.WriteString(f.Function)
			sb.WriteString("\n\t")
			sb.WriteString(f.File)
			sb.WriteByte(':')
			sb.WriteString(strconv.Itoa(f.Line))
			sb.WriteByte('\n')
		}
		if !more {
			break
		}
	}
	return sb.String()
}

// unwatchLocked ends leak detection for be, which is no longer checked out
// by the caller it was watched for.
func (b *budget) unwatchLocked(be *backend) {
	if be.watch.listed {
		b.watched.remove(be)
	}
	be.leaked = false
}

func (b *budget) expiryLocked(be *backend) time.Time {
	at := be.idleSince.Add(b.idleTimeout)
	if b.lifetime > 0 {
		if l := be.created.Add(b.lifetime); l.Before(at) {
			at = l
		}
	}
	return at
}

func (b *budget) armReaperLocked(at, now time.Time) {
	if !b.closed {
		b.reaper.arm(b.clock, at, now)
	}
}

// collectEvery bounds how often waiting callers trigger a garbage
// collection while stray handles exist.
const collectEvery = time.Second

// collectLocked triggers a garbage collection, off the lock, unless one was
// triggered less than collectEvery ago: a caller waits while handles of
// closed *sql.DBs are open, and those the application dropped give their
// backends back only once the collector finds them (reclaim.go). It
// repeats every collectEvery while callers wait and strays are left: a
// handle may become garbage only after a collection (the application drops
// it later, or database/sql's goroutine of the closed *sql.DB had not
// ended yet).
func (b *budget) collectLocked(now time.Time) {
	if next := b.lastCollect.Add(collectEvery); !b.lastCollect.IsZero() && now.Before(next) {
		b.armCollectorLocked(next, now)
		return
	}
	b.lastCollect = now
	b.collections++
	go runtime.GC()
	b.armCollectorLocked(now.Add(collectEvery), now)
}

func (b *budget) armCollectorLocked(at, now time.Time) {
	if !b.closed {
		b.collector.arm(b.clock, at, now)
	}
}

func (b *budget) armLeakCheckLocked(at, now time.Time) {
	if !b.closed {
		b.leakCheck.arm(b.clock, at, now)
	}
}
