package main

import (
	"fmt"
	"math/rand/v2"
	"time"
)

// op is one operation of the workload: a primary-key lookup, or an update
// of the same row, in one workspace's kv table.
type op struct {
	ws    int32 // workspace index, 0..W-1
	key   int32 // kv.id, 1..rows
	write bool
	// neighbour: the noisy neighbour's long statement (pg_sleep), run but
	// left out of the measurement, which is of the others.
	neighbour bool
}

// trace is the workload of one (W, distribution) cell: one fixed sequence
// of operations per worker, generated from fixed seeds before any contender
// runs, so that every contender is offered exactly the same operations in
// the same order. A contender consumes a prefix of each sequence (a faster
// one a longer prefix); a worker that reaches the end starts over, which
// the result reports (wrapped).
type trace struct {
	workspaces int
	dist       string
	workers    [][]op
}

const (
	distZipf       = "zipf"
	distRoundRobin = "rr"
	// distNoisy: half the workers are a noisy neighbour, workspace 0 running
	// neighbourSleep statements; the other half read primary keys in
	// workspaces 1..W-1, uniformly. distQuiet is the same others without
	// the neighbour (half the workers), the baseline they are compared with.
	distNoisy = "noisy"
	distQuiet = "quiet"
	zipfS     = 1.1 // the skew the demo and the load test use
)

// neighbourSleep is how long each of the noisy neighbour's statements runs.
const neighbourSleep = 500 * time.Millisecond

// newTrace generates perWorker operations for each of workers workers.
// Every worker has its own PCG stream keyed by (seed, distribution,
// worker), so a sequence does not depend on how many other workers there
// are or on the order they are generated in.
func newTrace(dist string, workspaces, workers, perWorker, rows int, writes float64, seed uint64) (*trace, error) {
	if workspaces < 1 || workers < 1 || perWorker < 1 || rows < 1 {
		return nil, fmt.Errorf("trace: workspaces, workers, operations per worker and rows must be positive (got %d, %d, %d, %d)",
			workspaces, workers, perWorker, rows)
	}
	var salt uint64
	switch dist {
	case distZipf:
		salt = 1
	case distRoundRobin:
		salt = 2
	case distNoisy, distQuiet:
		salt = 3 // the others' sequences are the same in both
		if workspaces < 2 || workers < 2 {
			return nil, fmt.Errorf("trace: %s needs at least 2 workspaces and 2 workers", dist)
		}
	default:
		return nil, fmt.Errorf("trace: unknown distribution %q (want %s, %s, %s or %s)", dist, distZipf, distRoundRobin, distNoisy, distQuiet)
	}
	if dist == distNoisy || dist == distQuiet {
		return neighbourTrace(dist, workspaces, workers, perWorker, rows, seed, salt), nil
	}
	t := &trace{workspaces: workspaces, dist: dist, workers: make([][]op, workers)}
	for w := range workers {
		r := rand.New(rand.NewPCG(seed, salt<<32|uint64(w)))
		var z *rand.Zipf
		if dist == distZipf && workspaces > 1 {
			// Rank 0 is the hottest workspace. rand.NewZipf needs imax >= 1.
			z = rand.NewZipf(r, zipfS, 1, uint64(workspaces-1))
		}
		seq := make([]op, perWorker)
		for i := range seq {
			var ws int
			switch {
			case z != nil:
				ws = int(z.Uint64())
			case dist == distRoundRobin:
				// Interleaved one operation per worker at a time, the
				// workers together visit 0, 1, 2, ... W-1, 0, ...: every
				// workspace is touched once before any is touched again,
				// the worst case for any cache smaller than W.
				ws = (i*workers + w) % workspaces
			}
			seq[i] = op{ws: int32(ws), key: int32(1 + r.IntN(rows)), write: writes > 0 && r.Float64() < writes}
		}
		t.workers[w] = seq
	}
	return t, nil
}

// neighbourTrace is distNoisy's or distQuiet's trace: the others are
// workers/2 workers reading uniformly in workspaces 1..W-1; distNoisy adds
// as many workers running the neighbour's statement in workspace 0.
func neighbourTrace(dist string, workspaces, workers, perWorker, rows int, seed, salt uint64) *trace {
	others := workers / 2
	t := &trace{workspaces: workspaces, dist: dist}
	for w := range others {
		r := rand.New(rand.NewPCG(seed, salt<<32|uint64(w)))
		seq := make([]op, perWorker)
		for i := range seq {
			seq[i] = op{ws: int32(1 + r.IntN(workspaces-1)), key: int32(1 + r.IntN(rows))}
		}
		t.workers = append(t.workers, seq)
	}
	if dist == distNoisy {
		for range workers - others {
			t.workers = append(t.workers, []op{{ws: 0, key: 1, neighbour: true}})
		}
	}
	return t
}

// global returns the workspaces of the trace interleaved one operation per
// worker at a time: the order a perfectly fair scheduler would issue them
// in. The cache simulations run on it; the real runs interleave however the
// scheduler and the server let them.
func (t *trace) global() []int32 {
	n := len(t.workers[0])
	out := make([]int32, 0, n*len(t.workers))
	for i := range n {
		for _, seq := range t.workers {
			if i < len(seq) {
				out = append(out, seq[i].ws)
			}
		}
	}
	return out
}

// ops returns the total number of operations in the trace.
func (t *trace) ops() int {
	n := 0
	for _, seq := range t.workers {
		n += len(seq)
	}
	return n
}
