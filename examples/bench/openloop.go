package main

import (
	"context"
	"math/rand/v2"
	"slices"
	"sync"
	"time"
)

// Open loop: operations arrive at a fixed offered rate (Poisson: exponential
// gaps from a fixed seed) whatever the contender does, and each one's
// latency is measured from its scheduled arrival, not from when it started.
// A closed loop slows its offered load down when the contender slows (the
// workers wait), which hides queueing; here a late operation shows as late
// (no coordinated omission). The operations are the trace's, interleaved one
// per worker as in the cache models, so each tenant's Zipf share holds.

// maxInFlight bounds the operations running at once. An arrival beyond it
// waits for a slot, and the wait counts in its latency.
const maxInFlight = 4096

// driveOpen offers rate operations per second of tr to tgt for warmup and
// then window; operations scheduled during the warm-up are not measured.
func driveOpen(ctx context.Context, tgt target, tr *trace, rate float64, warmup, window, opTimeout time.Duration, lv *live, seed uint64) *measurement {
	r := rand.New(rand.NewPCG(seed, 0x6f70656e)) // "open"
	slots := make(chan struct{}, maxInFlight)
	var mu sync.Mutex
	m := &measurement{} // guarded by mu until ended
	ended := false      // guarded by mu
	var wg sync.WaitGroup
	start := time.Now()
	measureFrom := start.Add(warmup)
	end := measureFrom.Add(window)
	lv.phase.Store(phaseWarmup)
	at := start
	for k := 0; ctx.Err() == nil; k++ {
		at = at.Add(time.Duration(r.ExpFloat64() / rate * float64(time.Second)))
		if !at.Before(end) {
			break
		}
		if d := time.Until(at); d > 0 {
			t := time.NewTimer(d)
			select {
			case <-ctx.Done():
			case <-t.C:
			}
			t.Stop()
		}
		if !at.Before(measureFrom) {
			lv.phase.Store(phaseMeasure)
		}
		seq := tr.workers[k%len(tr.workers)]
		o := seq[(k/len(tr.workers))%len(seq)]
		scheduled, counted := at, !at.Before(measureFrom)
		slots <- struct{}{} // the wait for a slot is part of the latency
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			octx, cancel := context.WithTimeout(ctx, opTimeout)
			err := tgt.exec(octx, o)
			cancel()
			lat := time.Since(scheduled)
			if o.neighbour {
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if ended {
				return // abandoned as stuck: the measurement is out
			}
			if err != nil {
				lv.errs.Add(1)
				if counted {
					k := classify(err)
					m.errs[k]++
					if m.firstErr[k] == "" {
						m.firstErr[k] = scrub(err.Error())
					}
				}
				return
			}
			lv.ok.Add(1)
			m.totalOps++
			if counted {
				m.lat = append(m.lat, lat)
			}
		}()
	}
	lv.phase.Store(phaseStop)
	if !waitFor(&wg, opTimeout+stuckGrace) {
		mu.Lock()
		m.stuck = len(slots)
		m.errs[errStuck] += int64(m.stuck)
		m.firstErr[errStuck] = "an operation still running " + stuckGrace.String() + " after its deadline"
		mu.Unlock()
	}
	mu.Lock()
	defer mu.Unlock()
	ended = true
	// Throughput is over the offered window: in an open loop the rate is
	// given, and what is measured is whether the contender kept up with it.
	m.window = window
	m.ops = int64(len(m.lat))
	slices.Sort(m.lat)
	return m
}
