package main

import (
	"fmt"
	"math/rand/v2"
)

// op is one operation of the workload: a primary-key lookup, or an update
// of the same row, in one workspace's kv table.
type op struct {
	ws    int32 // workspace index, 0..W-1
	key   int32 // kv.id, 1..rows
	write bool
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
	zipfS          = 1.1 // the skew the demo and the load test use
)

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
	default:
		return nil, fmt.Errorf("trace: unknown distribution %q (want %s or %s)", dist, distZipf, distRoundRobin)
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

// global returns the workspaces of the trace interleaved one operation per
// worker at a time: the order a perfectly fair scheduler would issue them
// in. The cache simulations run on it; the real runs interleave however the
// scheduler and the server let them.
func (t *trace) global() []int32 {
	n := len(t.workers[0])
	out := make([]int32, 0, n*len(t.workers))
	for i := range n {
		for _, seq := range t.workers {
			out = append(out, seq[i].ws)
		}
	}
	return out
}

// ops returns the total number of operations in the trace.
func (t *trace) ops() int { return len(t.workers) * len(t.workers[0]) }
