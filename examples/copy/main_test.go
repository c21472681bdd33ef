package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/tenantpg/tenantpg/examples/internal/demo"
)

func TestCopy(t *testing.T) {
	var out bytes.Buffer
	err := run(context.Background(), 3, 10000, &out)
	demo.CheckRun(t, err, out.String())
	if got := strings.Count(out.String(), "copied 10000 contacts"); got != 3 {
		t.Fatalf("want 3 workspaces with 10000 rows each:\n%s", out.String())
	}
}
