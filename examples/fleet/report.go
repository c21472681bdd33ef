package main

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"
)

type report struct {
	o        options
	external bool
	modes    []*modeResult
}

// killTarget is issue #12's bound on the time from a replica's death until
// its slots serve the others.
const killTarget = 2 * time.Second

func (rep *report) mode(name string) *modeResult {
	for _, m := range rep.modes {
		if m.mode == name {
			return m
		}
	}
	return nil
}

// problems are what makes the run itself unusable (not a target missed):
// a replica that failed, reported nothing or printed garbage.
func (rep *report) problems() []string {
	var out []string
	for _, m := range rep.modes {
		for _, e := range m.exitErrs {
			out = append(out, m.mode+": "+e)
		}
		expected := rep.o.replicas
		if m.kill != nil && m.kill.skipped == "" {
			expected-- // the victim never prints its final line
		}
		if m.finals != expected || m.badLines > 0 || m.lines == 0 {
			out = append(out, fmt.Sprintf("%s: %d of %d replicas finished, %d per-second lines, %d unparsable",
				m.mode, m.finals, expected, m.lines, m.badLines))
		}
	}
	return out
}

func percentile(hist map[int]int64, q float64) float64 {
	var total int64
	for _, n := range hist {
		total += n
	}
	if total == 0 {
		return 0
	}
	rank := int64(q * float64(total))
	var seen int64
	for _, b := range slices.Sorted(maps.Keys(hist)) {
		if seen += hist[b]; seen > rank {
			return ms(bucketValue(b))
		}
	}
	return 0
}

func (m *modeResult) errorCount() int64 {
	var n int64
	for _, v := range m.errs {
		n += v
	}
	return n
}

func (m *modeResult) errorText() string {
	if len(m.errs) == 0 {
		return "0"
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m.errs)) {
		parts = append(parts, fmt.Sprintf("%s %d", k, m.errs[k]))
	}
	return fmt.Sprintf("%d (%s)", m.errorCount(), strings.Join(parts, ", "))
}

func (rep *report) opsPerSec(m *modeResult) float64 {
	return float64(m.ops) / rep.o.duration.Seconds()
}

func (rep *report) refusedText(m *modeResult) string {
	switch {
	case rep.external:
		return "n/a (not our server)"
	case m.refusedLossy:
		return fmt.Sprintf("≥ %d", m.refused)
	}
	return fmt.Sprint(m.refused)
}

func (k *killResult) text() string {
	switch {
	case k == nil:
		return "–"
	case k.skipped != "":
		return "not killed: " + k.skipped
	}
	verdict := "met"
	if k.reuseAfter < 0 || k.reuseAfter > killTarget {
		verdict = "not met"
	}
	return fmt.Sprintf("%s (replica-%d held %d, gone after %s; survivors > %d; target ≤ %s %s)",
		dur(k.reuseAfter), k.victim, k.held, dur(k.goneAfter), k.survivors, killTarget, verdict)
}

func dur(d time.Duration) string {
	if d < 0 {
		return "never"
	}
	return d.Round(time.Millisecond).String()
}

func (rep *report) write(w io.Writer) {
	o := rep.o
	fmt.Fprintf(w, "\n## Fleet budget F=%d: %d replicas × %d workers (%d while not hot), W=%d Zipf s=%.2f, phase %s, %s per mode\n\n",
		o.fleetBudget, o.replicas, o.workers, o.coldWorkers, o.workspaces, o.zipfS, o.phase, o.duration)
	fmt.Fprintln(w, "| mode | budget per replica | ops/s | dials/s | p50 ms | p99 ms | caller errors | server peak (role) | coordination sessions | 53300 in server log | drivers' refused dials | kill -9 → slots reused |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|")
	for _, m := range rep.modes {
		fmt.Fprintf(w, "| %s | %d | %.0f | %.0f | %.2f | %.2f | %s | %d / %d | %d | %s | %d | %s |\n",
			m.mode, m.perReplica, rep.opsPerSec(m), float64(m.dials)/o.duration.Seconds(), percentile(m.hist, 0.5), percentile(m.hist, 0.99),
			m.errorText(), m.peak, o.fleetBudget, m.coordPeak, rep.refusedText(m), m.rejected, m.kill.text())
	}

	// Per phase: the hot replica moves, and a budget that follows it keeps
	// the throughput flat.
	phases := len(rep.modes[0].opsByPhase)
	fmt.Fprintf(w, "\nops/s by phase (hot replica):\n\n| mode |")
	for p := 0; p < phases; p++ {
		fmt.Fprintf(w, " %d (r%d) |", p, p%o.replicas)
	}
	fmt.Fprintf(w, "\n|---|%s\n", strings.Repeat("---:|", phases))
	for _, m := range rep.modes {
		fmt.Fprintf(w, "| %s |", m.mode)
		for p, n := range m.opsByPhase {
			length := min(o.phase, o.duration-time.Duration(p)*o.phase)
			fmt.Fprintf(w, " %.0f |", float64(n)/length.Seconds())
		}
		fmt.Fprintln(w)
	}

	if o.timeline {
		rep.writeTimeline(w)
	}

	fmt.Fprintln(w, "\nSummary:")
	fleet, static, unco := rep.mode("fleet"), rep.mode("static"), rep.mode("uncoordinated")
	if fleet != nil && static != nil && rep.opsPerSec(static) > 0 {
		fmt.Fprintf(w, "- fleet/static %.2f×", rep.opsPerSec(fleet)/rep.opsPerSec(static))
		if unco != nil && rep.opsPerSec(unco) > 0 {
			fmt.Fprintf(w, ", fleet/uncoordinated %.2f×", rep.opsPerSec(fleet)/rep.opsPerSec(unco))
		}
		fmt.Fprintln(w, " (ops/s)")
	} else if fleet != nil && unco != nil && rep.opsPerSec(unco) > 0 {
		fmt.Fprintf(w, "- fleet/uncoordinated %.2f× (ops/s)\n", rep.opsPerSec(fleet)/rep.opsPerSec(unco))
	}
	for _, m := range rep.modes {
		fmt.Fprintf(w, "- %s: %.0f ops/s, %s caller errors, the role peaked at %d of %d sessions, %s refusals in the server log",
			m.mode, rep.opsPerSec(m), m.errorText(), m.peak, o.fleetBudget, rep.refusedText(m))
		if m.yielded > 0 {
			fmt.Fprintf(w, ", %d backends closed for another replica", m.yielded)
		}
		if m.firstErr != "" {
			fmt.Fprintf(w, "; first error: %s", strings.ReplaceAll(m.firstErr, password, "****"))
		}
		fmt.Fprintln(w, ".")
	}
	if fleet != nil && fleet.coordPeak == 0 {
		fmt.Fprintf(w, "- fleet: no session of the role in the coordination database %q: this build of the library "+
			"ignores TENANTPG_FLEET_*, so fleet mode ran as uncoordinated.\n", fleetDatabase())
	}
	for _, p := range rep.problems() {
		fmt.Fprintln(w, "- PROBLEM:", p)
	}
}

// lockedWriter serialises the replicas' forwarded stderr and the parent's
// own status lines.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

// writeTimeline prints, per mode and second, each replica's reads,
// connections held, fleet share and callers waiting: where a budget that
// should follow the load lags behind it.
func (rep *report) writeTimeline(w io.Writer) {
	o := rep.o
	for _, m := range rep.modes {
		fmt.Fprintf(w, "\n%s, per second: ops/open/share/waiting by replica (* hot)\n\n| s |", m.mode)
		for i := 0; i < o.replicas; i++ {
			fmt.Fprintf(w, " r%d |", i)
		}
		fmt.Fprintf(w, "\n|---|%s\n", strings.Repeat("---|", o.replicas))
		secs := make([]int, 0, len(m.timeline))
		for s := range m.timeline {
			secs = append(secs, s)
		}
		slices.Sort(secs)
		for _, s := range secs {
			cells := make([]string, o.replicas)
			for _, l := range m.timeline[s] {
				hot := ""
				if l.Hot {
					hot = "*"
				}
				cells[l.Replica] = fmt.Sprintf("%s%d/%d/%d/%d", hot, l.Ops, l.Open, l.Share, l.Waiting)
			}
			fmt.Fprintf(w, "| %d | %s |\n", s, strings.Join(cells, " | "))
		}
	}
}
