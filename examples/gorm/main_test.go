package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/tenantpg/tenantpg"

	"github.com/tenantpg/tenantpg/examples/internal/demo"
)

func TestGorm(t *testing.T) {
	var out bytes.Buffer
	err := run(context.Background(), 12, 4, &out)
	demo.CheckRun(t, err, out.String())
	if !strings.Contains(out.String(), "12 workspaces migrated") || !strings.Contains(out.String(), "budget of 4") {
		t.Fatalf("unexpected output:\n%s", out.String())
	}
	t.Log(out.String())
}

// TestGormInterleavedWorkspaces uses two workspaces alternately on one
// *gorm.DB from one goroutine: each row lands in, and is read from, the
// database its context names, and a transaction stays on its workspace.
func TestGormInterleavedWorkspaces(t *testing.T) {
	ctx := context.Background()
	world, err := demo.Start(ctx, 2, 2)
	demo.SkipIfNoServer(t, err)
	if err != nil {
		t.Fatal(err)
	}
	defer world.Stop()
	drv, err := tenantpg.NewDriver(tenantpg.Config{MaxConnections: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer drv.Close()
	sqlDB, err := drv.OpenDB(world.RoutedDSN)
	if err != nil {
		t.Fatal(err)
	}
	defer sqlDB.Close()
	db, err := gorm.Open(postgres.New(postgres.Config{Conn: sqlDB}), &gorm.Config{Logger: logger.Discard})
	if err != nil {
		t.Fatal(err)
	}
	a := db.WithContext(tenantpg.WithWorkspace(ctx, world.Workspaces[0]))
	b := db.WithContext(tenantpg.WithWorkspace(ctx, world.Workspaces[1]))
	for _, w := range []*gorm.DB{a, b} {
		if err := w.AutoMigrate(&Contact{}); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 3; i++ {
		if err := a.Create(&Contact{Email: fmt.Sprintf("a%d@example.com", i)}).Error; err != nil {
			t.Fatal(err)
		}
		if err := b.Create(&Contact{Email: fmt.Sprintf("b%d@example.com", i)}).Error; err != nil {
			t.Fatal(err)
		}
	}
	err = a.Transaction(func(tx *gorm.DB) error {
		return tx.Create(&Contact{Email: "a-tx@example.com"}).Error
	})
	if err != nil {
		t.Fatal(err)
	}
	for w, prefix := range map[*gorm.DB]string{a: "a", b: "b"} {
		var emails []string
		if err := w.Model(&Contact{}).Order("email").Pluck("email", &emails).Error; err != nil {
			t.Fatal(err)
		}
		for _, e := range emails {
			if !strings.HasPrefix(e, prefix) {
				t.Fatalf("workspace %s holds %v", prefix, emails)
			}
		}
		if want := map[string]int{"a": 4, "b": 3}[prefix]; len(emails) != want {
			t.Fatalf("workspace %s holds %d contacts, want %d: %v", prefix, len(emails), want, emails)
		}
	}
	var n int64
	if err := db.Model(&Contact{}).Count(&n).Error; !errors.Is(err, tenantpg.ErrNoWorkspace) {
		t.Fatalf("a call without a workspace: got %v, want ErrNoWorkspace", err)
	}
}
