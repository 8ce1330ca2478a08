package framework

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// DefaultStopGracePeriod is how long a process gets to exit after SIGTERM before
// its whole process group is killed.
const DefaultStopGracePeriod = 5 * time.Second

// Process is a command started in its own process group, with stdout and stderr
// written to a log file. Stop ends the whole group, so helpers that the command
// starts do not outlive it.
type Process struct {
	// Name identifies the process in errors and log dumps.
	Name string
	// LogPath is the file that receives stdout and stderr.
	LogPath string
	// StopGracePeriod is how long Stop waits after SIGTERM before it kills the
	// process group.
	StopGracePeriod time.Duration
	// Started is when the process was started (just before fork and exec).
	Started time.Time

	cmd  *exec.Cmd
	done chan struct{}

	mu      sync.Mutex
	waitErr error
	stopped bool
}

// StartProcess starts binary with args. Output goes to <logDir>/<name>.log.
// env entries are added to the test process' environment. The caller must call
// Stop, normally from a cleanup function.
func StartProcess(logDir, name string, env []string, binary string, args ...string) (*Process, error) {
	if _, err := os.Stat(binary); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	logPath := filepath.Join(logDir, name+".log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	// The child has its own copy of the descriptor.
	defer func() { _ = logFile.Close() }()
	fmt.Fprintf(logFile, "+ %s %s\n", binary, strings.Join(args, " "))

	cmd := exec.Command(binary, args...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid: true,
		// If the test binary dies without running its cleanups (SIGKILL, panic in
		// another goroutine), the kernel still ends the child.
		Pdeathsig: syscall.SIGKILL,
	}
	started := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Process{Name: name, LogPath: logPath, StopGracePeriod: DefaultStopGracePeriod, Started: started, cmd: cmd, done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		p.waitErr = err
		p.mu.Unlock()
		close(p.done)
	}()
	return p, nil
}

// Pid returns the process ID, which is also the process group ID.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Exited reports whether the process has ended and, if so, how.
func (p *Process) Exited() (bool, error) {
	select {
	case <-p.done:
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.waitErr == nil {
			return true, errors.New("exited with status 0")
		}
		return true, p.waitErr
	default:
		return false, nil
	}
}

// Wait waits until the process has been reaped and returns its exit error:
// nil for status 0.
func (p *Process) Wait() error {
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.waitErr
}

// Stop sends SIGTERM to the process group, waits up to a grace period and then
// sends SIGKILL to the group. It returns once the process has been reaped. Calling
// Stop more than once is fine.
func (p *Process) Stop() {
	p.mu.Lock()
	already := p.stopped
	p.stopped = true
	p.mu.Unlock()
	if !already {
		pgid := p.cmd.Process.Pid
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(p.StopGracePeriod):
		}
		// Also reaches children that ignored SIGTERM or outlived the leader.
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
	}
	<-p.done
}

// Kill sends SIGKILL to the process group without a grace period, as a crash
// would, and waits for the process to be reaped.
func (p *Process) Kill() {
	p.mu.Lock()
	p.stopped = true
	p.mu.Unlock()
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// LogTail returns the last n lines of the process' log.
func (p *Process) LogTail(n int) string {
	data, err := os.ReadFile(p.LogPath)
	if err != nil {
		return fmt.Sprintf("<cannot read %s: %v>", p.LogPath, err)
	}
	return tailLines(data, n)
}

// WaitReady calls check every interval until it succeeds, the process exits or the
// timeout expires. The error includes the last error of check and the tail of the
// log.
func (p *Process) WaitReady(ctx context.Context, timeout time.Duration, check func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	const interval = 100 * time.Millisecond
	start := time.Now()
	for {
		if exited, err := p.Exited(); exited {
			return fmt.Errorf("%s exited before it became ready: %w\n%s", p.Name, err, p.logTailForError())
		}
		checkCtx, checkCancel := context.WithTimeout(ctx, 5*time.Second)
		lastErr := check(checkCtx)
		checkCancel()
		if lastErr == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready after %v: %w\n%s", p.Name, time.Since(start).Round(time.Millisecond), lastErr, p.logTailForError())
		case <-time.After(interval):
		}
	}
}

// WaitForLog waits until the process' log contains text. It fails early when
// the process exits.
func (p *Process) WaitForLog(ctx context.Context, timeout time.Duration, text string) error {
	return p.WaitReady(ctx, timeout, func(context.Context) error {
		data, err := os.ReadFile(p.LogPath)
		if err != nil {
			return err
		}
		if !bytes.Contains(data, []byte(text)) {
			return fmt.Errorf("log does not contain %q yet", text)
		}
		return nil
	})
}

func (p *Process) logTailForError() string {
	const lines = 30
	return fmt.Sprintf("last %d lines of %s:\n%s", lines, p.LogPath, p.LogTail(lines))
}

func tailLines(data []byte, n int) string {
	data = bytes.TrimRight(data, "\n")
	lines := bytes.Split(data, []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}
