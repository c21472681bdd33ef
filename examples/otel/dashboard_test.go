package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

const dashboardFile = "grafana-dashboard.json"

// dashboard is the part of a Grafana dashboard model the tests read.
type dashboard struct {
	SchemaVersion int `json:"schemaVersion"`
	Inputs        []struct {
		Name     string `json:"name"`
		Type     string `json:"type"`
		PluginID string `json:"pluginId"`
	} `json:"__inputs"`
	Templating struct {
		List []struct {
			Name       string          `json:"name"`
			Type       string          `json:"type"`
			Definition string          `json:"definition"`
			Datasource *datasourceRef  `json:"datasource"`
			Query      json.RawMessage `json:"query"`
		} `json:"list"`
	} `json:"templating"`
	Panels []panel `json:"panels"`
}

type panel struct {
	ID         int            `json:"id"`
	Type       string         `json:"type"`
	Title      string         `json:"title"`
	Datasource *datasourceRef `json:"datasource"`
	Targets    []struct {
		Expr         string         `json:"expr"`
		LegendFormat string         `json:"legendFormat"`
		RefID        string         `json:"refId"`
		Datasource   *datasourceRef `json:"datasource"`
	} `json:"targets"`
	Panels []panel `json:"panels"` // a collapsed row's panels
}

type datasourceRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

// query is one PromQL expression of the dashboard and where it is.
type query struct {
	where  string
	expr   string
	legend string
}

func loadDashboard(t *testing.T) (dashboard, []query) {
	t.Helper()
	raw, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	dec := json.NewDecoder(bytes.NewReader(raw))
	if err := dec.Decode(&d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	if !json.Valid(raw) {
		t.Fatalf("%s is not valid JSON", dashboardFile)
	}
	var qs []query
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			for _, tg := range p.Targets {
				qs = append(qs, query{where: "panel " + p.Title + " target " + tg.RefID, expr: tg.Expr, legend: tg.LegendFormat})
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	for _, v := range d.Templating.List {
		if v.Type == "query" {
			qs = append(qs, query{where: "variable " + v.Name, expr: v.Definition})
		}
	}
	return d, qs
}

var (
	// A metric or label name of tenantpg's instruments.
	ourName = regexp.MustCompile(`\b(?:tenantpg|db_client)_[A-Za-z0-9_]*`)
	// Label matchers, grouping clauses, range selectors and
	// label_values' label argument name labels or durations, not metrics.
	matchers    = regexp.MustCompile(`\{[^}]*\}`)
	grouping    = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)`)
	ranges      = regexp.MustCompile(`\[[^\]]*\]`)
	labelValues = regexp.MustCompile(`label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)`)
	matcherName = regexp.MustCompile(`([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)`)
	legendLabel = regexp.MustCompile(`\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}`)
	identifier  = regexp.MustCompile(`[A-Za-z_][A-Za-z0-9_]*`)
)

// namesIn returns the metric names and the label names a PromQL expression
// (or a label_values variable query) uses.
func namesIn(expr string) (metrics, labels []string) {
	for _, m := range labelValues.FindAllStringSubmatch(expr, -1) {
		metrics = append(metrics, m[1])
		labels = append(labels, m[2])
	}
	rest := labelValues.ReplaceAllString(expr, " ")
	for _, m := range matchers.FindAllString(rest, -1) {
		for _, n := range matcherName.FindAllStringSubmatch(m, -1) {
			labels = append(labels, n[1])
		}
	}
	rest = matchers.ReplaceAllString(rest, " ")
	for _, g := range grouping.FindAllStringSubmatch(rest, -1) {
		labels = append(labels, identifier.FindAllString(g[1], -1)...)
	}
	rest = grouping.ReplaceAllString(rest, " ")
	rest = ranges.ReplaceAllString(rest, " ")
	metrics = append(metrics, ourName.FindAllString(rest, -1)...)
	return metrics, labels
}

func TestNamesIn(t *testing.T) {
	m, l := namesIn(`histogram_quantile(0.99, sum by (le, db_client_connection_pool_name) (rate(db_client_connection_wait_time_seconds_bucket{db_client_connection_pool_name=~"$pool"}[$__rate_interval]))) / on (tenantpg_x) tenantpg_budget_limit`)
	if want := []string{"db_client_connection_wait_time_seconds_bucket", "tenantpg_budget_limit"}; !slices.Equal(m, want) {
		t.Errorf("metrics %q, want %q", m, want)
	}
	if want := []string{"db_client_connection_pool_name", "le", "db_client_connection_pool_name", "tenantpg_x"}; !slices.Equal(l, want) {
		t.Errorf("labels %q, want %q", l, want)
	}
	m, l = namesIn(`label_values(tenantpg_budget_limit, db_client_connection_pool_name)`)
	if !slices.Equal(m, []string{"tenantpg_budget_limit"}) || !slices.Equal(l, []string{"db_client_connection_pool_name"}) {
		t.Errorf("label_values: %q %q", m, l)
	}
}

// TestDashboardModel checks the dashboard's shape without a database: the
// datasource input, the schema version, unique panel ids, and that every
// target queries the input's datasource and names some metric.
func TestDashboardModel(t *testing.T) {
	d, qs := loadDashboard(t)
	if d.SchemaVersion < 36 {
		t.Errorf("schemaVersion %d", d.SchemaVersion)
	}
	if len(d.Inputs) != 1 || d.Inputs[0].Name != "DS_PROMETHEUS" || d.Inputs[0].PluginID != "prometheus" {
		t.Errorf("__inputs: %+v, want the one DS_PROMETHEUS prometheus input", d.Inputs)
	}
	ids := map[int]string{}
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			if prev, ok := ids[p.ID]; ok {
				t.Errorf("panels %q and %q share id %d", prev, p.Title, p.ID)
			}
			ids[p.ID] = p.Title
			if p.Type != "row" && (p.Datasource == nil || p.Datasource.UID != "${DS_PROMETHEUS}") {
				t.Errorf("panel %q: datasource %+v, want uid ${DS_PROMETHEUS}", p.Title, p.Datasource)
			}
			for _, tg := range p.Targets {
				if tg.Datasource == nil || tg.Datasource.UID != "${DS_PROMETHEUS}" {
					t.Errorf("panel %q target %s: datasource %+v", p.Title, tg.RefID, tg.Datasource)
				}
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	if len(qs) < 10 {
		t.Errorf("only %d queries in the dashboard", len(qs))
	}
	for _, q := range qs {
		if m, _ := namesIn(q.expr); len(m) == 0 {
			t.Errorf("%s: no tenantpg_ or db_client_ metric in %q", q.where, q.expr)
		}
	}
}

// TestDashboardMatchesScrape runs the example, scrapes /metrics after
// traffic has dialed, waited, used and evicted connections, and checks that
// every metric the dashboard queries is a family in the scrape (a _bucket,
// _sum or _count name of a histogram family), and that every label it groups
// by, matches on or shows in a legend is on some series of the scrape.
func TestDashboardMatchesScrape(t *testing.T) {
	_, qs := loadDashboard(t)

	const budget = 6
	r := startExample(t, budget, 3*time.Second)
	addr := r.addr

	// Scrape until connections have been used and evicted (30 workspaces
	// with a cap of 3 over a budget of 6 evict by LRU) and callers waited.
	var families map[string]string
	var labels map[string]bool
	deadline := time.Now().Add(3 * time.Second)
	for {
		var series map[string][]sample
		families, labels, series = scrapeFamilies(t, "http://"+addr+"/metrics")
		if positive(series["db_client_connection_use_time_seconds_count"]) &&
			positive(series["tenantpg_budget_evictions_total"]) &&
			positive(series["db_client_connection_wait_time_seconds_count"]) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no use, eviction or wait in /metrics after 3s of traffic; families %v", families)
		}
		time.Sleep(50 * time.Millisecond)
	}

	var queried []string
	for _, q := range qs {
		metrics, labelNames := namesIn(q.expr)
		for _, m := range legendLabel.FindAllStringSubmatch(q.legend, -1) {
			labelNames = append(labelNames, m[1])
		}
		for _, m := range metrics {
			queried = append(queried, m)
			if !inScrape(families, m) {
				t.Errorf("%s queries %s, which the scrape does not have", q.where, m)
			}
		}
		for _, l := range labelNames {
			if !labels[l] {
				t.Errorf("%s uses label %s, which no series of the scrape has", q.where, l)
			}
		}
	}
	sort.Strings(queried)
	queried = slices.Compact(queried)
	t.Logf("metrics the dashboard queries: %s", strings.Join(queried, " "))
	if len(queried) < 8 {
		t.Errorf("only %d distinct metrics found in the dashboard's queries", len(queried))
	}

	if err := <-r.errc; err != nil {
		t.Fatalf("%v\n%s", err, r.out.String())
	}
}

// inScrape reports whether name is a family of the scrape, or a
// histogram family's _bucket, _sum or _count series.
func inScrape(families map[string]string, name string) bool {
	if typ, ok := families[name]; ok {
		return typ != "histogram" && typ != "summary"
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		base, ok := strings.CutSuffix(name, suffix)
		if !ok {
			continue
		}
		switch families[base] {
		case "histogram":
			return true
		case "summary":
			return suffix != "_bucket"
		}
	}
	return false
}

func positive(ss []sample) bool {
	for _, s := range ss {
		if s.value > 0 {
			return true
		}
	}
	return false
}

var labelName = regexp.MustCompile(`([A-Za-z_][A-Za-z0-9_]*)="`)

// scrapeFamilies reads one scrape and returns's families by name with their type (from
// the # TYPE lines), the label names its series carry, and its series.
func scrapeFamilies(t *testing.T, url string) (map[string]string, map[string]bool, map[string][]sample) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	families := map[string]string{}
	labels := map[string]bool{}
	series := map[string][]sample{}
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if f := strings.Fields(line); len(f) == 4 && f[0] == "#" && f[1] == "TYPE" {
			families[f[2]] = f[3]
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, rest := line, ""
		if i := strings.IndexAny(line, "{ "); i >= 0 {
			name, rest = line[:i], line[i:]
		}
		var s sample
		if strings.HasPrefix(rest, "{") {
			end := strings.LastIndex(rest, "}")
			s.labels, rest = rest[:end+1], rest[end+1:]
			for _, m := range labelName.FindAllStringSubmatch(s.labels, -1) {
				labels[m[1]] = true
			}
		}
		if f := strings.Fields(rest); len(f) > 0 {
			s.value, _ = strconv.ParseFloat(f[0], 64)
		}
		series[name] = append(series[name], s)
	}
	return families, labels, series
}
