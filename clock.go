package tenantpg

import "time"

// clock is where the budget reads time and arms timers, as database/sql's
// nowFunc: the real clock in production, a manual one in the state-machine
// test, which then decides when every armed timer fires.
type clock interface {
	Now() time.Time
	AfterFunc(d time.Duration, f func()) timer
}

// timer is the part of *time.Timer the budget uses.
type timer interface {
	Stop() bool
	Reset(d time.Duration) bool
}

type realClock struct{}

func (realClock) Now() time.Time                            { return time.Now() }
func (realClock) AfterFunc(d time.Duration, f func()) timer { return time.AfterFunc(d, f) }

// wakeup runs fn at the earliest time it has been armed for, on a timer, so
// nothing runs while it is not armed. Guarded by budget.mu; fn must call
// fired under that lock before looking at the state.
type wakeup struct {
	fn    func()
	timer timer
	at    time.Time
	armed bool
}

func (w *wakeup) arm(c clock, at, now time.Time) {
	if w.armed && !at.Before(w.at) {
		return
	}
	w.at, w.armed = at, true
	if w.timer == nil {
		w.timer = c.AfterFunc(at.Sub(now), w.fn)
	} else {
		w.timer.Reset(at.Sub(now))
	}
}

func (w *wakeup) fired() { w.armed = false }

func (w *wakeup) stop() {
	if w.timer != nil {
		w.timer.Stop()
	}
	w.armed = false
}

// ewma is an exponentially weighted moving average of durations, in
// nanoseconds. The first sample sets it; zero means nothing measured yet.
type ewma float64

func (e *ewma) add(d time.Duration, alpha float64) {
	if *e == 0 {
		*e = ewma(d)
		return
	}
	*e += ewma(alpha * (float64(d) - float64(*e)))
}

func (e ewma) duration() time.Duration { return time.Duration(e) }
