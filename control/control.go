// Package control is the client of a graceful server's control socket
// ([github.com/graceful-go/graceful.Options.ControlSocket]): it asks the server to upgrade itself
// and learns the outcome, which "kill -HUP" cannot report. The command
// gracefulctl is built on it.
package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/graceful-go/graceful"
)

// Upgrade asks the process serving the control socket at path to upgrade
// itself ([github.com/graceful-go/graceful.Process.Upgrade]) and waits for the outcome, at most
// until ctx ends (the process's UpgradeTimeout bounds it too). It returns the
// answer's text once the new process is ready ("upgraded: pid N ready after
// D; pid M draining"), or an error carrying the reason the upgrade failed;
// the old process keeps serving then. An error wrapping [ErrNoAnswer] says
// that no answer came (the process exited, or ctx ended): the upgrade may
// still go on, and [Details] tells how it ended.
func Upgrade(ctx context.Context, path string) (string, error) {
	return do(ctx, path, "upgrade")
}

// Status returns the serving process's PID and phase ("pid N serving"), as
// the process at the control socket at path answers it.
func Status(ctx context.Context, path string) (string, error) {
	return do(ctx, path, "status")
}

// Details returns what the process at the control socket at path reports
// of itself ([github.com/graceful-go/graceful.Process.Status]): PID,
// generation, build, start time, phase, the last upgrades and the totals.
// A process of a version that does not know the request answers with an
// error naming it as unknown.
func Details(ctx context.Context, path string) (graceful.Status, error) {
	var st graceful.Status
	msg, err := do(ctx, path, "status-json")
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal([]byte(msg), &st); err != nil {
		return st, fmt.Errorf("control: status-json: %w", err)
	}
	return st, nil
}

// ErrNoAnswer is wrapped by the errors of requests that were sent (or may
// have been) but got no answer: the connection failed, the process exited,
// or ctx ended. An upgrade asked for may then still go on, and end either
// way: [Details] tells how it ended.
var ErrNoAnswer = errors.New("no answer")

// MaxAnswer bounds the length of an answer line the client reads; a
// longer one is an error.
const MaxAnswer = 16 << 20

func do(ctx context.Context, path, command string) (string, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return "", fmt.Errorf("control: %w", err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	// A refusal may arrive before the request is read: still read it.
	_, werr := io.WriteString(conn, command+"\n")
	line, err := bufio.NewReader(io.LimitReader(conn, MaxAnswer+1)).ReadString('\n')
	if err != nil {
		switch {
		case len(line) > MaxAnswer:
			return "", fmt.Errorf("control: %s: answer longer than %d MiB: not read", command, MaxAnswer>>20)
		case werr != nil:
			err = werr
		case ctx.Err() != nil:
			err = context.Cause(ctx)
		case errors.Is(err, io.EOF):
			err = errors.New("the process closed the connection without an answer (did it exit?)")
		}
		return "", fmt.Errorf("control: %s: %w: %w", command, ErrNoAnswer, err)
	}
	line = strings.TrimSuffix(line, "\n")
	if msg, ok := strings.CutPrefix(line, "ok "); ok {
		return msg, nil
	}
	if msg, ok := strings.CutPrefix(line, "error "); ok {
		return "", errors.New(msg)
	}
	return "", fmt.Errorf("control: malformed answer %q", line)
}
