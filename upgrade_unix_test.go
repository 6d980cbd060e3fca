//go:build unix

package graceful

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cloudflare/tableflip"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Malformed activation variables are an error that names the variable, and
// no descriptor is adopted.
func TestTakeActivatedMalformed(t *testing.T) {
	pid := strconv.Itoa(os.Getpid())
	cases := []struct {
		pid, fds, names string
		want            string
	}{
		{"abc", "1", "", "LISTEN_PID"},
		{"-4", "1", "", "LISTEN_PID"},
		{pid, "x", "", "LISTEN_FDS"},
		{pid, "-1", "", "LISTEN_FDS"},
		{pid, "100000", "", "LISTEN_FDS"},
		{pid, "2", "web", "LISTEN_FDNAMES"},
		{pid, "1000", "", "descriptor"}, // fd 3 is not a listening socket here
	}
	for _, c := range cases {
		t.Setenv("LISTEN_PID", c.pid)
		t.Setenv("LISTEN_FDS", c.fds)
		t.Setenv("LISTEN_FDNAMES", c.names)
		acts, err := takeActivated()
		require.Error(t, err, "%+v", c)
		assert.Contains(t, err.Error(), c.want)
		assert.Nil(t, acts)
		_, set := os.LookupEnv("LISTEN_FDS")
		assert.False(t, set, "variables removed")
	}
}

// Variables meant for another process (a child inherits the parent's) are
// ignored without error.
func TestTakeActivatedOtherPID(t *testing.T) {
	t.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid()+1))
	t.Setenv("LISTEN_FDS", "1")
	acts, err := takeActivated()
	require.NoError(t, err)
	assert.Nil(t, acts)
}

// TestTableflipInternals fails loudly when an upgrade of tableflip changes
// what upgrade_unix.go relies on: the child's marker variable, its pipes to
// the parent at descriptors 3 and 4, and the text of Upgrade's refusal while
// the parent lives. It runs a real parent and child (this test binary, in
// the role its environment gives) using tableflip alone.
func TestTableflipInternals(t *testing.T) {
	if dir := os.Getenv("GRACEFUL_TEST_TABLEFLIP_DIR"); dir != "" {
		os.Exit(tableflipProbe(dir))
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestTableflipInternals$")
	cmd.Env = append(os.Environ(), "GRACEFUL_TEST_TABLEFLIP_DIR="+dir, "GORACE=atexit_sleep_ms=0")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "probe parent: %s", out)
	b, err := os.ReadFile(filepath.Join(dir, "child"))
	require.NoError(t, err, "the child reports")
	report := string(b)
	assert.Contains(t, report, "marker: set\n", "tableflip marks its child with %s", tableflipSentinel)
	assert.Contains(t, report, "pipes: ok\n", "a child's pipes to its parent are descriptors %d and %d", tableflipPipeWrite, tableflipPipeRead)
	assert.Contains(t, report, "has parent: true\n")
	assert.Contains(t, report, "upgrade while the parent lives: "+tableflipParentAlive, "the refusal's text upgrade() retries on")
	assert.Contains(t, string(out), "upgrade before ready: "+tableflipNotReady, "the refusal's text upgrade() retries on")
}

// tableflipProbe is both roles of TestTableflipInternals: the parent starts
// a child with tableflip and waits for its report; the child writes what it
// sees of tableflip's internals to dir/child.
func tableflipProbe(dir string) int {
	report := filepath.Join(dir, "child")
	if os.Getenv(tableflipSentinel) == "" {
		upg, err := tableflip.New(tableflip.Options{UpgradeTimeout: 10 * time.Second})
		if err != nil {
			fmt.Println("parent:", err)
			return 1
		}
		defer upg.Stop()
		fmt.Println("upgrade before ready:", upg.Upgrade())
		if err := upg.Ready(); err != nil {
			fmt.Println("parent ready:", err)
			return 1
		}
		for i := 0; ; i++ {
			err = upg.Upgrade()
			if err == nil {
				break
			}
			if i == 100 || !tableflipLagging(err) {
				fmt.Println("parent upgrade:", err)
				return 1
			}
			time.Sleep(time.Millisecond)
		}
		// Stay alive until the child has tried to upgrade while we live.
		for range 1000 {
			if _, err := os.Stat(report); err == nil {
				return 0
			}
			time.Sleep(10 * time.Millisecond)
		}
		fmt.Println("parent: no report from the child")
		return 1
	}
	var b strings.Builder
	b.WriteString("marker: set\n")
	if err := checkParentPipes(10 * time.Second); err == nil {
		b.WriteString("pipes: ok\n")
	} else {
		fmt.Fprintf(&b, "pipes: %v\n", err)
	}
	upg, err := tableflip.New(tableflip.Options{})
	if err != nil {
		fmt.Fprintf(&b, "new: %v\n", err)
	} else {
		fmt.Fprintf(&b, "has parent: %v\n", upg.HasParent())
		if err := upg.Ready(); err != nil {
			fmt.Fprintf(&b, "ready: %v\n", err)
		}
		err := upg.Upgrade()
		for i := 0; i < 100 && err != nil && strings.Contains(err.Error(), tableflipNotReady); i++ {
			time.Sleep(time.Millisecond) // tableflip has not seen Ready yet
			err = upg.Upgrade()
		}
		fmt.Fprintf(&b, "upgrade while the parent lives: %v\n", err)
		upg.Stop()
	}
	tmp := report + ".tmp"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o644); err != nil || os.Rename(tmp, report) != nil {
		return 1
	}
	if upg != nil {
		// Outlive the parent: a child that exits right after Ready can make
		// the parent's Upgrade report "exited" instead of success.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		upg.WaitForParent(ctx)
	}
	return 0
}
