// Command gorm uses GORM over tenantpg for many workspaces with one
// *gorm.DB: its *sql.DB is opened with a {workspace} DSN, and each request
// names its workspace in the context,
//
//	db.WithContext(tenantpg.WithWorkspace(ctx, id))
//
// Every workspace runs AutoMigrate, creates and queries rows and commits a
// transaction in its own database, while all of them share one connection
// budget far below what per-workspace pools would need.
//
// gorm.Open pings the database, naming no workspace: for a {workspace}
// *sql.DB that is a health check of the server.
//
//	go run ./examples/gorm
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/tenantpg/tenantpg"
	"github.com/tenantpg/tenantpg/examples/internal/demo"
)

// Contact is a workspace's contact.
type Contact struct {
	ID     uint   `gorm:"primaryKey"`
	Email  string `gorm:"uniqueIndex;not null"`
	Name   string
	Emails []Email
}

// Email is a message sent to a contact.
type Email struct {
	ID        uint `gorm:"primaryKey"`
	ContactID uint
	Subject   string
}

func main() {
	if err := run(context.Background(), 40, 8, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "gorm:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, workspaces, budget int, out io.Writer) error {
	world, err := demo.Start(ctx, workspaces, budget)
	if err != nil {
		return err
	}
	defer world.Stop()
	drv, err := tenantpg.NewDriver(tenantpg.Config{MaxConnections: budget})
	if err != nil {
		return err
	}
	defer drv.Close()

	sqlDB, err := drv.OpenDB(world.RoutedDSN)
	if err != nil {
		return err
	}
	defer sqlDB.Close()
	db, err := gorm.Open(postgres.New(postgres.Config{Conn: sqlDB}),
		&gorm.Config{Logger: logger.Discard})
	if err != nil {
		return err
	}

	// Migrations first, one workspace after another: GORM's AutoMigrate is
	// not safe to run concurrently on one *gorm.DB (it parses the shared
	// schema's indexes in place; gorm v1.31.2 under the race detector).
	for _, id := range world.Workspaces {
		if err := db.WithContext(tenantpg.WithWorkspace(ctx, id)).AutoMigrate(&Contact{}, &Email{}); err != nil {
			return fmt.Errorf("workspace %s: migrate: %w", id, err)
		}
	}

	// One goroutine per workspace, all at once: 40 workspaces × 3
	// connections would be 120; the budget is 8.
	errs := make(chan error, workspaces)
	var wg sync.WaitGroup
	for _, id := range world.Workspaces {
		wg.Add(1)
		go func(id string) {
			defer wg.Done()
			if err := workspace(db.WithContext(tenantpg.WithWorkspace(ctx, id))); err != nil {
				errs <- fmt.Errorf("workspace %s: %w", id, err)
			}
		}(id)
	}
	wg.Wait()
	close(errs)
	if err := errors.Join(func() (all []error) {
		for e := range errs {
			all = append(all, e)
		}
		return
	}()...); err != nil {
		return err
	}
	s := drv.Stats()
	fmt.Fprintf(out, "%d workspaces migrated and used through one *gorm.DB; peak %d connections of a budget of %d; %d dials\n",
		workspaces, s.PeakOpen, s.Limit, s.Dials)
	return nil
}

// workspace works in the workspace db's context names.
func workspace(db *gorm.DB) error {
	err := db.Transaction(func(tx *gorm.DB) error {
		c := Contact{Email: "ada@example.com", Name: "Ada", Emails: []Email{{Subject: "Welcome"}, {Subject: "Your invoice"}}}
		if err := tx.Create(&c).Error; err != nil {
			return err
		}
		return tx.Model(&Contact{}).Where("id = ?", c.ID).Update("name", "Ada Lovelace").Error
	})
	if err != nil {
		return err
	}
	var got Contact
	if err := db.Preload("Emails").First(&got, "email = ?", "ada@example.com").Error; err != nil {
		return err
	}
	if got.Name != "Ada Lovelace" || len(got.Emails) != 2 {
		return fmt.Errorf("read back %+v", got)
	}
	// A transaction that fails leaves nothing behind.
	_ = db.Transaction(func(tx *gorm.DB) error {
		tx.Create(&Contact{Email: "ghost@example.com"})
		return errors.New("roll back")
	})
	var n int64
	if err := db.Model(&Contact{}).Where("email = ?", "ghost@example.com").Count(&n).Error; err != nil {
		return err
	}
	if n != 0 {
		return errors.New("rolled-back row is visible")
	}
	return nil
}
