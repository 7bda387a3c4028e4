-- tollgate.money: integer money helpers for policies. Amounts are integers
-- in the asset's atomic units (micro-USD for USD and USDC: 6 decimals),
-- never floats; Lua numbers hold integers exactly up to 2^53.
--
--   money.from_decimal("0.015", 6) -> 15000   (more decimals than allowed: error)
--   money.to_decimal(15000, 6)     -> "0.015"
--   money.percent(15000, 12.5)     -> 1875    (rounded half up)
--   money.round(1874.5)            -> 1875    (half up, for your own arithmetic)
--   money.is_amount(v)             -> true for integers 0..2^53
--   money.MAX                      -> 2^53

local floor, type, tostring, error, sfind, ssub, srep, smatch =
  math.floor, type, tostring, error, string.find, string.sub, string.rep, string.match

local M = {}

local MAX = 9007199254740992
M.MAX = MAX

local function is_int(v)
  return type(v) == "number" and v == floor(v) and v >= -MAX and v <= MAX
end

local function check_decimals(d)
  if not is_int(d) or d < 0 or d > 18 then
    error("decimals must be an integer 0..18, got " .. tostring(d), 3)
  end
end

function M.is_amount(v)
  return is_int(v) and v >= 0
end

function M.round(x)
  if type(x) ~= "number" or x ~= x or x == math.huge or x == -math.huge then
    error("round: expected a finite number, got " .. tostring(x), 2)
  end
  local r = floor(x + 0.5)
  if r > MAX or r < -MAX then error("round: result out of range", 2) end
  return r
end

function M.from_decimal(s, decimals)
  check_decimals(decimals)
  if type(s) == "number" then
    error("from_decimal: pass the amount as a string (\"0.015\"), not a float", 2)
  end
  if type(s) ~= "string" then error("from_decimal: expected a string, got " .. type(s), 2) end
  local sign, int, frac = smatch(s, "^(%-?)(%d+)%.?(%d*)$")
  if not int or (frac == "" and sfind(s, "%.$")) then
    error("from_decimal: not a decimal number: " .. s, 2)
  end
  frac = frac:gsub("0+$", "")
  if #frac > decimals then
    error("from_decimal: " .. s .. " has more than " .. decimals .. " decimals", 2)
  end
  local digits = (int .. frac .. srep("0", decimals - #frac)):gsub("^0+", "")
  if #digits > 16 then error("from_decimal: " .. s .. " is out of range", 2) end
  local v = digits == "" and 0 or tonumber(digits)
  if v > MAX then error("from_decimal: " .. s .. " is out of range", 2) end
  if sign == "-" then v = -v end
  return v
end

function M.to_decimal(amount, decimals)
  check_decimals(decimals)
  if not is_int(amount) then error("to_decimal: expected an integer amount, got " .. tostring(amount), 2) end
  local neg = amount < 0
  local s = string.format("%.0f", neg and -amount or amount)
  if decimals > 0 then
    if #s <= decimals then s = srep("0", decimals - #s + 1) .. s end
    local int, frac = ssub(s, 1, #s - decimals), ssub(s, #s - decimals + 1)
    frac = frac:gsub("0+$", "")
    s = frac == "" and int or (int .. "." .. frac)
  end
  if neg and s ~= "0" then s = "-" .. s end
  return s
end

function M.percent(amount, pct)
  if not is_int(amount) then error("percent: expected an integer amount, got " .. tostring(amount), 2) end
  if type(pct) ~= "number" or pct ~= pct or pct == math.huge or pct == -math.huge then
    error("percent: expected a finite percentage, got " .. tostring(pct), 2)
  end
  local x = amount * pct / 100
  -- amount * pct / 100 carries float error (e.g. 14.999999...): snap to the
  -- nearest 1e-9 before rounding half up.
  local r = floor(floor(x * 1e9 + 0.5) / 1e9 + 0.5)
  if r > MAX or r < -MAX then error("percent: result out of range", 2) end
  return r
end

return M
