package tenantpg

import (
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// What the driver takes back on its own: idle backends past their idle time
// or lifetime (the reaper), backends whose handle became garbage (reclaim,
// and the stray collector that hastens it), and backends held for too long,
// which it reports (the leak watch). Each has a timer (clock.go's wakeup),
// armed only while it has something to do.
//
// Reclaiming what a closed *sql.DB abandoned: a *sql.Rows or *sql.Conn that
// is never closed keeps its handle checked out, and the handle its backend
// and token. database/sql keeps every connection reachable from its DB
// while the DB is open, so a leaked handle cannot be told from a slow
// reader then. Once the application has closed the *sql.DB and dropped it
// and the leaked Rows or Conn, the handle is garbage: a cleanup
// (runtime.AddCleanup) attached to it closes its backend through the budget
// (eviction reason abandoned) and gives the token back.
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
// while handles of closed *sql.DBs are still open (strayCollector) triggers
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

// newHandle returns a handle of cn's pool, or of r's workspaces,
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

// The reaper.

// expiryLocked is when idle backend be is to be closed: at the end of its
// idle time or of its lifetime, whichever comes first.
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

// reapLocked closes the idle backends past their idle timeout or lifetime
// at now, and arms the reaper for the next expiry. It runs on the reaper's
// timer, armed for the earliest expiry, so an idle driver costs no
// goroutine.
func (b *budget) reapLocked(now time.Time) {
	b.reaper.fired()
	var next time.Time
	for _, s := range b.servers {
		s.recency.each(func(x *backendPool) {
			for be := x.idleBackends.back; be != nil; {
				prev := x.idleBackends.prev(be)
				if at := b.expiryLocked(be); !at.After(now) {
					reason := reasonIdleTimeout
					if b.lifetime > 0 && now.Sub(be.created) >= b.lifetime {
						reason = reasonLifetime
					}
					b.evictLocked(be, reason, nil)
				} else if next.IsZero() || at.Before(next) {
					next = at
				}
				be = prev
			}
		})
	}
	if !next.IsZero() {
		b.armReaperLocked(next, now)
	}
}

// Handles that became garbage.

// abandonLocked closes be, checked out by a handle that became garbage
// without giving it back, at now.
func (b *budget) abandonLocked(be *backend, now time.Time) {
	p := be.db
	b.eventLocked(event{kind: evAbandoned, workspace: p.workspace, held: now.Sub(be.checkedOut), stack: be.stack})
	b.closeBusyLocked(be, reasonAbandoned, nil)
	b.growLocked(p)
}

// strayCollector hastens reclaiming while callers wait: strays are the
// handles still open whose connector (their *sql.DB or Pool) was closed,
// busy ones finishing or ones the application leaked. While there are
// some, a caller that waits triggers a garbage collection, at most once per
// collectEvery, so that the backends of handles that became garbage are
// reclaimed without waiting for the next natural collection; its timer
// repeats it while callers still wait. Guarded by budget.mu; never locks,
// never blocks, holds no *budget (its timer's callback is the budget's
// collectAgain).
type strayCollector struct {
	count int
	last  time.Time // when a collection was last triggered
	timer wakeup
}

// collectEvery bounds how often waiting callers trigger a garbage
// collection while stray handles exist.
const collectEvery = time.Second

// due reports whether a collection may be triggered at now, and when the
// next may be. A collection is due when none was triggered for
// collectEvery; one that is due counts as triggered.
func (c *strayCollector) due(now time.Time) (bool, time.Time) {
	if next := c.last.Add(collectEvery); !c.last.IsZero() && now.Before(next) {
		return false, next
	}
	c.last = now
	return true, now.Add(collectEvery)
}

// collectLocked triggers a garbage collection, off the lock, unless one was
// triggered less than collectEvery ago: a caller waits while handles of
// closed *sql.DBs are open, and those the application dropped give their
// backends back only once the collector finds them. It repeats every
// collectEvery while callers wait and strays are left: a handle may become
// garbage only after a collection (the application drops it later, or
// database/sql's goroutine of the closed *sql.DB had not ended yet).
func (b *budget) collectLocked(now time.Time) {
	due, next := b.strays.due(now)
	if due {
		b.counters.collections++
		go runtime.GC()
	}
	if !b.closed {
		b.strays.timer.arm(b.clock, next, now)
	}
}

// Leaks.

// leakWatch holds the backends checked out while Config.LeakThreshold was
// set and not yet reported, oldest checkout first, so that a scan stops at
// the first young one; its timer runs the scan (checkLeaks) when the oldest
// passes the threshold. Guarded by budget.mu; never locks, never blocks,
// holds no *budget (its timer's callback is the budget's checkLeaks).
type leakWatch struct {
	watched list[backend, backendWatched]
	timer   wakeup
}

// add watches be, just checked out. It reports whether the timer must be
// armed: it is not armed for an older checkout.
func (l *leakWatch) add(be *backend) bool {
	l.watched.pushBack(be)
	return !l.timer.armed
}

// drop ends the watch of be, which is no longer checked out by the caller
// it was watched for.
func (l *leakWatch) drop(be *backend) {
	if be.watch.listed {
		l.watched.remove(be)
	}
	be.leaked = false
}

func (b *budget) armLeakCheckLocked(at, now time.Time) {
	if !b.closed {
		b.watch.timer.arm(b.clock, at, now)
	}
}

// checkLeaksLocked reports the backends checked out for longer than the
// leak threshold at now, once each, with the stack of the code that
// checked them out, and arms the check for the next; with the threshold
// off it stops watching.
func (b *budget) checkLeaksLocked(now time.Time) {
	b.watch.timer.fired()
	th := time.Duration(b.leakThreshold.Load())
	for be := b.watch.watched.front; be != nil; be = b.watch.watched.front {
		if th > 0 && now.Sub(be.checkedOut) < th {
			b.armLeakCheckLocked(be.checkedOut.Add(th), now)
			break // the rest were checked out later
		}
		b.watch.watched.remove(be)
		if th > 0 {
			be.leaked = true
			b.counters.leaks++
			b.eventLocked(event{kind: evLeak, workspace: be.db.workspace, held: now.Sub(be.checkedOut), threshold: th, stack: be.stack})
		}
	}
}
