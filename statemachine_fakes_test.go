package tenantpg

import (
	"sync"
	"time"
)

// The state-machine test's fakes: a manual clock whose timers fire only
// when the test fires them, contexts the test ends itself, and a stand-in
// for pgx whose sockets drain when the test says so.

// smEpoch is the model's time zero.
var smEpoch = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)

// smHang bounds the real time the test waits for a goroutine the model says
// must finish (a served waiter, Driver.Close): only a hang reaches it.
const smHang = 10 * time.Second

// smClock is the manual clock: Now is the model's time, and AfterFunc
// records a timer that fires only when the test fires it.
type smClock struct {
	mu     sync.Mutex
	now    time.Time
	seq    int
	timers []*smTimer
}

type smTimer struct {
	c      *smClock
	f      func()
	at     time.Time
	seq    int // arming order: ties between timers due at once
	active bool
}

func (c *smClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *smClock) AfterFunc(d time.Duration, f func()) timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq++
	t := &smTimer{c: c, f: f, at: c.now.Add(d), seq: c.seq, active: true}
	c.timers = append(c.timers, t)
	return t
}

func (t *smTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := t.active
	t.active = false
	return was
}

func (t *smTimer) Reset(d time.Duration) bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := t.active
	t.c.seq++
	t.seq, t.at, t.active = t.c.seq, t.c.now.Add(d), true
	return was
}

func (t *smTimer) state() (at time.Time, active bool) {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	return t.at, t.active
}

// earliest returns the armed timer due first, or nil.
func (c *smClock) earliest() *smTimer {
	c.mu.Lock()
	defer c.mu.Unlock()
	var e *smTimer
	for _, t := range c.timers {
		if t.active && (e == nil || t.at.Before(e.at) || t.at.Equal(e.at) && t.seq < e.seq) {
			e = t
		}
	}
	return e
}

// expire disarms t as if its time had come, moving the clock to it (never
// backwards: a timer armed in the past fires now).
func (c *smClock) expire(t *smTimer) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t.active = false
	if t.at.After(c.now) {
		c.now = t.at
	}
}

func (c *smClock) set(to time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if to.After(c.now) {
		c.now = to
	}
}

// forget drops a timer that can never fire again.
func (c *smClock) forget(t *smTimer) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, x := range c.timers {
		if x == t {
			c.timers = append(c.timers[:i], c.timers[i+1:]...)
			return
		}
	}
}

func (c *smClock) all() []*smTimer {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*smTimer(nil), c.timers...)
}

// smCtx is a context the test ends itself, with the error it chooses: an
// acquire timeout (DeadlineExceeded) or a cancellation.
type smCtx struct {
	done chan struct{}
	mu   sync.Mutex
	err  error
}

func newSMCtx() *smCtx                       { return &smCtx{done: make(chan struct{})} }
func (c *smCtx) Deadline() (time.Time, bool) { return time.Time{}, false }
func (c *smCtx) Done() <-chan struct{}       { return c.done }
func (c *smCtx) Value(any) any               { return nil }

func (c *smCtx) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// end ends the context with err, unless it has ended already.
func (c *smCtx) end(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
		close(c.done)
	}
}

// smIO stands in for pgx: closing a backend closes its socket (starting its
// drain, which the test ends later) unless the socket was closed already,
// and a backend is broken when the model broke it.
type smIO struct {
	b        *budget
	mu       sync.Mutex
	broke    map[*backend]bool
	sockOpen map[*backend]bool
	closed   []*backend // in close order, since the model last looked
}

func (io *smIO) close(be *backend) {
	io.mu.Lock()
	io.closed = append(io.closed, be)
	start := io.sockOpen[be]
	io.sockOpen[be] = false
	io.mu.Unlock()
	if start {
		io.b.drainStarted()
	}
}

func (io *smIO) broken(be *backend) bool {
	io.mu.Lock()
	defer io.mu.Unlock()
	return io.broke[be]
}

func (io *smIO) set(m map[*backend]bool, be *backend, v bool) {
	io.mu.Lock()
	defer io.mu.Unlock()
	m[be] = v
}

func (io *smIO) takeClosed() []*backend {
	io.mu.Lock()
	defer io.mu.Unlock()
	c := io.closed
	io.closed = nil
	return c
}
