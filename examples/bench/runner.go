package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tenantpg/tenantpg"
)

// Error kinds, as the report counts them.
const (
	errTooMany   = iota // the server refused the connection: SQLSTATE 53300 (role or server limit)
	errExhausted        // the contender's own limit: tenantpg.ErrBudgetExhausted, the seed's connection-limit error
	errDeadline         // the operation's deadline passed (waiting in a queue, e.g. PgBouncer's)
	errStuck            // the operation ignored its deadline: still running long after it (the worker is abandoned)
	errOther
	numErrKinds
)

var errKindNames = [numErrKinds]string{"53300", "exhausted", "deadline", "stuck", "other"}

// classify sorts an operation's error. The order matters: tenantpg's
// BudgetError wraps the context's error when the caller's deadline ended the
// wait, and a refused dial that ran out of time wraps both the server's
// 53300 and the deadline; each is counted as its first cause.
func classify(err error) int {
	var pgErr *pgconn.PgError
	var seedErr *seedLimitError
	switch {
	case errors.Is(err, tenantpg.ErrBudgetExhausted), errors.As(err, &seedErr):
		return errExhausted
	case errors.As(err, &pgErr) && pgErr.Code == "53300":
		return errTooMany
	case errors.Is(err, context.DeadlineExceeded):
		return errDeadline
	}
	return errOther
}

// measurement is what one run of one contender produced.
type measurement struct {
	window   time.Duration // from the warm-up's end until the last operation ended
	ops      int64         // successful operations that ended after the warm-up
	totalOps int64         // successful operations, warm-up included
	errs     [numErrKinds]int64
	firstErr [numErrKinds]string // the first error of each kind, password scrubbed
	lat      []time.Duration     // latencies of the successful operations of the window, sorted
	wrapped  bool                // some worker reached the end of its sequence and started over
	stuck    int                 // workers still in an operation long after its deadline, abandoned
}

// stuckGrace is how long after the operation deadline a worker may take to
// return before it is counted as stuck and abandoned: the harness must stop
// by itself even when a contender ignores its context.
const stuckGrace = 5 * time.Second

// Run phases.
const (
	phaseWarmup int32 = iota
	phaseMeasure
	phaseStop
)

// live are the counters the progress line reads while a run goes on.
type live struct {
	phase    atomic.Int32
	ok, errs atomic.Int64
}

// drive runs the trace's workers against tgt: warm-up, then the measured
// window, then it stops the workers and waits for them. An operation counts
// when it ended after the warm-up; one still running when the window ends is
// waited for (at most opTimeout) and counted, so slow operations are not
// dropped from the latency tail, and one stuck since the warm-up counts as
// the error or the latency it ends with. Latencies are of successful
// operations; failures are counted by kind.
func drive(ctx context.Context, tgt target, tr *trace, warmup, window, opTimeout time.Duration, lv *live) *measurement {
	type workerResult struct {
		lat      []time.Duration
		totalOps int64
		errs     [numErrKinds]int64
		firstErr [numErrKinds]error
		wrapped  bool
		ended    time.Time   // when the worker returned
		done     atomic.Bool // set when the worker has returned; its fields are final then
	}
	results := make([]workerResult, len(tr.workers))
	lv.phase.Store(phaseWarmup)
	var wg sync.WaitGroup
	for w, seq := range tr.workers {
		wg.Add(1)
		go func(res *workerResult) {
			defer wg.Done()
			defer func() {
				res.ended = time.Now()
				res.done.Store(true)
			}()
			res.lat = make([]time.Duration, 0, 4096)
			for i := 0; ctx.Err() == nil; i++ {
				if lv.phase.Load() == phaseStop {
					return
				}
				if i == len(seq) && !seq[0].neighbour {
					res.wrapped = true // the neighbour repeats its one statement by design
				}
				o := seq[i%len(seq)]
				octx, cancel := context.WithTimeout(ctx, opTimeout)
				start := time.Now()
				err := tgt.exec(octx, o)
				d := time.Since(start)
				cancel()
				// Counted when it ended after the warm-up: an operation
				// stuck since the warm-up shows as what it is, not as
				// nothing.
				counted := lv.phase.Load() != phaseWarmup
				if o.neighbour {
					continue // the measurement is of the others
				}
				if err != nil {
					lv.errs.Add(1)
					if counted {
						k := classify(err)
						res.errs[k]++
						if res.firstErr[k] == nil {
							res.firstErr[k] = err
						}
					}
					continue
				}
				lv.ok.Add(1)
				res.totalOps++
				if counted {
					res.lat = append(res.lat, d)
				}
			}
		}(&results[w])
	}

	sleep := func(d time.Duration) {
		select {
		case <-ctx.Done():
		case <-time.After(d):
		}
	}
	sleep(warmup)
	lv.phase.Store(phaseMeasure)
	start := time.Now()
	sleep(window)
	lv.phase.Store(phaseStop)
	// A worker whose operation ignores its deadline is left running: its
	// results are left out (it may still write them) and it counts as
	// stuck below.
	waitFor(&wg, opTimeout+stuckGrace)
	// The window runs until the last worker has finished its last
	// operation, so that the operations counted and the time they had are
	// the same: every operation that ended after the warm-up, over the time
	// from the warm-up's end until no operation is left. A stuck worker's
	// wait is not part of it.
	m := &measurement{window: time.Since(start)}
	var lastEnd time.Time
	for i := range results {
		if results[i].done.Load() && results[i].ended.After(lastEnd) {
			lastEnd = results[i].ended
		}
	}
	if !lastEnd.IsZero() {
		m.window = lastEnd.Sub(start)
	}

	for i := range results {
		r := &results[i]
		if !r.done.Load() {
			m.stuck++
			m.errs[errStuck]++
			m.firstErr[errStuck] = "an operation still running " + stuckGrace.String() + " after its deadline"
			continue
		}
		m.lat = append(m.lat, r.lat...)
		m.totalOps += r.totalOps
		m.wrapped = m.wrapped || r.wrapped
		for k := range numErrKinds {
			m.errs[k] += r.errs[k]
			if m.firstErr[k] == "" && r.firstErr[k] != nil {
				m.firstErr[k] = scrub(r.firstErr[k].Error())
			}
		}
	}
	m.ops = int64(len(m.lat))
	slices.Sort(m.lat)
	return m
}

// waitFor waits for wg, at most d; it reports whether wg finished.
func waitFor(wg *sync.WaitGroup, d time.Duration) bool {
	finished := make(chan struct{})
	go func() {
		wg.Wait()
		close(finished)
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-finished:
		return true
	case <-t.C:
		return false
	}
}

// percentile returns the p-th percentile (0 < p < 100) of sorted latencies
// by the nearest-rank method, or 0 when there are none.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(p/100*float64(len(sorted))+0.999999) - 1
	return sorted[min(max(rank, 0), len(sorted)-1)]
}

func (m *measurement) errors() int64 {
	var n int64
	for _, e := range m.errs {
		n += e
	}
	return n
}

// scrub removes the password from an error text, in case a driver ever
// quotes a DSN (pgx does not).
func scrub(s string) string { return strings.ReplaceAll(s, password, "[redacted]") }

func (m *measurement) String() string {
	return fmt.Sprintf("%d ok in %s, %d errors", m.ops, m.window.Round(time.Millisecond), m.errors())
}

// nonZero formats the non-zero counts of m, sorted by name.
func nonZero(m map[string]uint64) string {
	keys := make([]string, 0, len(m))
	for k, v := range m {
		if v != 0 {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s %d", k, m[k])
	}
	return "{" + strings.Join(parts, ", ") + "}"
}

// tokenSampler records where tenantpg's tokens are during a run (in use,
// idle, dialing, closing) and how many callers wait: the idle ones are the
// only cache a miss can be served from, so this says why a hit rate is what
// it is. It keeps the samples for the occupancy plot.
type tokenSampler struct {
	stopc   chan struct{}
	done    chan string
	samples []occupancy // written by the sampler until done delivers
}

// occupancy is one sample of the budget, at offset at from the run's start.
type occupancy struct {
	at                                     time.Duration
	inUse, idle, dialing, closing, waiting int
}

func sampleTokens(s statser, every time.Duration) *tokenSampler {
	t := &tokenSampler{stopc: make(chan struct{}), done: make(chan string, 1)}
	start := time.Now()
	go func() {
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			select {
			case <-t.stopc:
				t.done <- t.summary()
				return
			case <-tick.C:
				st := s.stats()
				t.samples = append(t.samples, occupancy{at: time.Since(start), inUse: st.InUse, idle: st.Idle,
					dialing: st.Dialing, closing: st.Closing, waiting: st.Waiting})
			}
		}
	}()
	return t
}

func (t *tokenSampler) summary() string {
	n := len(t.samples)
	if n == 0 {
		return "no samples"
	}
	var sum occupancy
	for _, o := range t.samples {
		sum.inUse += o.inUse
		sum.idle += o.idle
		sum.dialing += o.dialing
		sum.closing += o.closing
		sum.waiting += o.waiting
	}
	f := func(v int) float64 { return float64(v) / float64(n) }
	return fmt.Sprintf("in use %.1f, idle %.1f, dialing %.1f, closing %.1f, waiting callers %.1f",
		f(sum.inUse), f(sum.idle), f(sum.dialing), f(sum.closing), f(sum.waiting))
}

// stop ends the sampling and returns the averages and the samples.
func (t *tokenSampler) stop() (string, []occupancy) {
	close(t.stopc)
	s := <-t.done
	return s, t.samples
}
